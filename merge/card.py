"""The release's model card: README.md with what went into it, and the training run's sample images.

Everything comes from the inputs: the base model path, each LoRA's file header (shardtune's training record,
peft's adapter config, or kohya's ss_* fields; a kohya file whose header has no rank gets its ranks and alphas
from its tensors), and the newest validation grid of the training run the LoRA
came from (`samples/step-*.png` next to the LoRA file). Nothing run-specific (no dates, no absolute
temporary paths) goes in, so reruns give the same bytes.
"""
import glob
import json
import os
import shutil
from collections import Counter
from typing import Dict, List, Optional, Sequence

from safetensors import SafetensorError, safe_open

from shards.common.atomic import atomic_open
from shards.common.errors import DataError

from .config import MergeConfig, is_single_file
from .lora import METADATA_KEY
from shards.tensorfile import TensorFile
from .text_encoders import describe

CARD_NAME = "README.md"
SAMPLES_DIR = "samples"
# kohya / sd-scripts training fields worth showing, with their labels.
KOHYA_FIELDS = {"ss_network_dim": "rank", "ss_network_alpha": "alpha", "ss_learning_rate": "learning rate",
                "ss_max_train_steps": "steps", "ss_resolution": "resolution", "ss_base_model_version": "base model"}


def lora_header(path: str) -> Dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def _json(header: Dict[str, str], key: str) -> dict:
    try:
        value = json.loads(header.get(key, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def training_facts(header: Dict[str, str]) -> Dict[str, object]:
    """Label -> value for the LoRA's training settings that its header records."""
    run = _json(header, "shardtune")
    facts: Dict[str, object] = {}
    if run:
        cfg = run.get("config", {})
        train = cfg.get("train", {})
        facts.update({"trained with": "shardtune", "rank": run.get("rank"), "alpha": run.get("alpha"),
                      "targets": ", ".join(run.get("targets") or []) or None,
                      "blocks": run.get("blocks"), "steps": run.get("steps"),
                      "learning rate": train.get("lr"), "batch size": train.get("batch_size"),
                      "optimizer": train.get("optimizer"), "base precision": cfg.get("model", {}).get("precision"),
                      "quantized base": cfg.get("model", {}).get("quantize"),
                      "shard sets": ", ".join(os.path.basename(os.path.normpath(s["path"])) for s in
                                              run.get("shard_sets", [])) or None,
                      "instance prompt": run.get("instance_prompt"), "caption prefix": run.get("caption_prefix"),
                      "validation prompts": "; ".join(run.get("validation_prompts") or []) or None,
                      # The settings above are the last ones; a resume that changed some says from when.
                      "changed on resume": "; ".join(
                          f"after step {c['step']}: " + ", ".join(f"{x['key']} {x['from']} -> {x['to']}"
                                                                for x in c["changes"])
                          for c in run.get("config_changes") or []) or None})
    else:
        adapter = _json(header, METADATA_KEY)
        adapter = {k[len("transformer."):]: v for k, v in adapter.items() if k.startswith("transformer.")} or adapter
        if adapter:
            facts.update({"rank": adapter.get("r"), "alpha": adapter.get("lora_alpha")})
        for key, label in KOHYA_FIELDS.items():
            if header.get(key):
                facts[label] = header[key]
    # sd-scripts writes str(None) for settings it was not given.
    return {k: v for k, v in facts.items() if v not in (None, "", [], "none", "None")}


def _spread(values: List[float]) -> str:
    """'4' when all modules agree, else '4 (12 modules), 8 (3 modules)'."""
    seen = Counter(values)
    if len(seen) == 1:
        return f"{values[0]:g}"
    return ", ".join(f"{v:g} ({n} module{'s' if n > 1 else ''})" for v, n in sorted(seen.items()))


def kohya_tensor_facts(path: str) -> Dict[str, str]:
    """rank and alpha of a kohya file from its tensors: rank = lora_down's first dim, alpha = the .alpha tensor
    (kohya's rule: none means alpha = rank). {} for a file that is not kohya's or cannot be read."""
    try:
        with TensorFile(path) as f:
            downs = {k[: -len(".lora_down.weight")]: e.shape[0] for k, e in f.entries.items()
                     if k.startswith("lora_") and k.endswith(".lora_down.weight") and e.shape}
            alphas = {}
            for name in downs:
                if name + ".alpha" in f.entries:
                    alphas[name] = float(f.get(name + ".alpha").float().reshape(-1)[0])
    except (OSError, DataError):  # the card only describes; reading the LoRA to merge it reports a broken file
        return {}
    if not downs:
        return {}
    names = sorted(downs)
    return {"rank": _spread([downs[n] for n in names]),
            "alpha": _spread([alphas.get(n, downs[n]) for n in names])}


def lora_facts(path: str, header: Dict[str, str]) -> Dict[str, object]:
    """training_facts, with a kohya file's ranks and alphas read from its tensors when the header has none."""
    facts = training_facts(header)
    if "rank" not in facts:
        tensors = kohya_tensor_facts(path)
        facts.update({k: v for k, v in tensors.items() if k == "rank" or "alpha" not in facts})
    return facts


def newest_sample(lora_file: str) -> Optional[str]:
    """The last validation grid of the training run the LoRA file belongs to, if that run left one."""
    grids = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(lora_file)), SAMPLES_DIR, "step-*.png")))
    return grids[-1] if grids else None


def _base_name(path: str) -> str:
    if is_single_file(path) or os.path.isdir(path):
        return os.path.basename(os.path.normpath(path))
    return path  # a hub id is already a name people know


def trained_info(cfg: MergeConfig) -> Optional[Dict]:
    """What the fully fine-tuned transformer's training recorded (its shardtune.json), for the card; None without
    transformer.path, {} for a folder that records nothing."""
    if not cfg.transformer.path:
        return None
    try:
        with open(os.path.join(cfg.transformer.folder(), "shardtune.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {"trained weights": "(not recorded)"}
    c = info.get("config", {}).get("train", {})
    facts = {"trained weights": len(info.get("trained", [])), "steps": info.get("steps"),
             "learning rate": c.get("lr"), "optimizer": c.get("optimizer"), "weights dtype": info.get("dtype"),
             "EMA": info.get("ema"), "blocks": info.get("config", {}).get("full", {}).get("blocks"),
             "instance prompt": info.get("instance_prompt"), "caption prefix": info.get("caption_prefix"),
             "shard set": ", ".join(s["path"] for s in info.get("shard_sets", []))}
    return {k: v for k, v in facts.items() if v not in (None, "", [])}


def write_card(out_dir: str, cfg: MergeConfig, lora_files: Sequence[str], files: List[str],
               text_merged: Optional[Dict[str, int]] = None, text_left_out: Optional[Dict[str, int]] = None) -> str:
    """Write out_dir/README.md (and copy sample grids into out_dir/samples/); returns the card's path.

    text_merged / text_left_out: text encoder -> LoRA modules folded into it / left out (not in the release)."""
    fmt = cfg.release_format()
    hub_base = not (is_single_file(cfg.model.path) or os.path.isdir(cfg.model.path))
    headers = [lora_header(f) for f in lora_files]
    facts = [lora_facts(f, h) for f, h in zip(lora_files, headers)]
    trained = trained_info(cfg)
    prompts = sorted({str(f[k]) for f in facts + [trained or {}] for k in ("instance prompt", "caption prefix")
                      if f.get(k)})

    front = ["---"]
    if hub_base:
        front += [f"base_model: {cfg.model.path}", "base_model_relation: finetune"]
    if fmt == "diffusers":
        front.append("library_name: diffusers")
    front += ["pipeline_tag: text-to-image", "tags:", "- stable-diffusion-3"] + ["- lora"] * bool(lora_files) + \
        ["- shardtune"]
    if prompts:
        front.append(f"instance_prompt: {json.dumps(prompts[0])}")
    front.append("---")

    title = cfg.out.name if fmt == "single_file" else " + ".join(
        [_base_name(cfg.model.path)] + [_base_name(cfg.transformer.path)] * (trained is not None)
        + [os.path.basename(p) for p in lora_files])
    into = "the transformer" + (" and text encoders" if text_merged else "")
    made = [f"Stable Diffusion 3 with {len(lora_files)} LoRA{'s' if len(lora_files) > 1 else ''} folded into "
            f"{into} by shardtune's merge stage."]
    if trained is not None:
        made = [f"Stable Diffusion 3 with a fully fine-tuned transformer (shardtune, train.mode=full: "
                f"{trained['trained weights']} of its weights trained)"
                + (f", and {len(lora_files)} LoRA{'s' if len(lora_files) > 1 else ''} folded into {into}" if lora_files
                   else "") + ", released by shardtune's merge stage."]
    lines = front + ["", f"# {title}", ""] + made + ["",
                     f"- base model: `{_base_name(cfg.model.path)}`",
                     f"- release format: {fmt} ({', '.join(files)}), out.dtype {cfg.out.dtype}"]
    if fmt == "single_file" and cfg.out.include:
        lines.append(f"- bundled with the transformer: {', '.join(cfg.out.include)}")
    if text_merged:
        lines.append(f"- text encoders: {describe(text_merged)} folded in")
    if text_left_out:
        lines.append(f"- not in this release, so not folded in: {describe(text_left_out)}")
    if prompts:
        lines.append(f"- trigger / instance prompt: `{prompts[0]}`" +
                     (f" (also: {', '.join(f'`{p}`' for p in prompts[1:])})" if len(prompts) > 1 else ""))
    lines.append("")

    samples_out = os.path.join(out_dir, SAMPLES_DIR)
    if trained is not None:
        lines += [f"## Fine-tuned transformer: `{cfg.transformer.path}`", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in trained.items()]
        lines.append("")
    for i, (path, scale, fact) in enumerate(zip(lora_files, cfg.lora.scales(), facts), start=1):
        lines += [f"## LoRA {i}: `{os.path.basename(path)}` (scale {scale:g})", ""]
        if fact:
            lines += ["| setting | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in fact.items()]
        else:
            lines.append("Its file records no training settings.")
        grid = newest_sample(path)
        if grid:
            os.makedirs(samples_out, exist_ok=True)
            name = f"lora{i}-{os.path.basename(grid)}"
            shutil.copyfile(grid, os.path.join(samples_out, name))
            lines += ["", f"Validation samples from its training run (the LoRA unmerged, {os.path.basename(grid)}):",
                      "", f"![samples]({SAMPLES_DIR}/{name})"]
        lines.append("")

    lines += ["## Use", ""]
    if fmt == "diffusers":
        lines += ["```python", "import torch", "from diffusers import StableDiffusion3Pipeline", "",
                  "pipe = StableDiffusion3Pipeline.from_pretrained(\"path/to/this/folder\", torch_dtype=torch.bfloat16)",
                  "```"]
    else:
        lines += [f"Load `{files[0]}` in ComfyUI or Forge like the original SD3 checkpoint, or in diffusers with "
                  "`SD3Transformer2DModel.from_single_file` / `StableDiffusion3Pipeline.from_single_file` "
                  "(with `config=` a diffusers SD3 folder of the same model)."]
    path = os.path.join(out_dir, CARD_NAME)
    # A new file renamed into place, never a write through an existing one: that could be a link to the base's.
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
