"""Stage 1 driver: inputs -> planned shards -> encoders -> shard set.

The inputs are sorted and cut into shards of `out.samples_per_shard` inputs each, so shard i always
holds the same inputs. That makes a run restartable (complete shards are kept, the rest redone),
partitionable (`part=i parts=N` takes shards i, i+N, ...; the parts together equal one run), and
stale-proof (each shard records its inputs' sizes and times; run.json records config and model).
"""
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from shards import format as F
from shards.common.config import flat_keys, resolve_device, to_dict
from shards.common.errors import DataError
from shards.common.fingerprint import folder_fingerprint
from shards.common.hub import resolve_model
from shards.manifest import Manifest, SampleSpec, read_manifest
from shards.writer import assemble, read_sidecar, write_extras

from .buckets import make_buckets
from .config import PrecomputeConfig
from .data import list_inputs
from .encode import encode_shards
from .encoders import (Residency, TextEncoders, VaeEncoder, encoders_fit, numerics, resolve_dtype,
                       vae_activation_bytes, vae_batch, weight_bytes)
from .inputs import IMAGE_EXTS, Item, is_webdataset
from .outdir import read_json, part_lock, prepare_out_dir
from .tars import expand, stream_items, tar_signature

# What precompute reads from a pipeline folder: never the transformer weights.
MODEL_FILES = ["model_index.json", "text_encoder*/*", "tokenizer*/*", "vae/*", "transformer/config.json",
               "scheduler/*"]
# Keys that do not change what is written (where things are, how fast, which part).
# batch_size is content: batched matmuls and convolutions round differently, and a resumed run must
# give bit-identical tensors, so batches are cut the same way inside each shard every time.
NOT_CONTENT = ("model.path", "model.revision", "data.path", "out.dir", "out.overwrite", "num_workers", "device",
               "part", "parts", "offload", "offload_group")


def content_config(cfg: PrecomputeConfig) -> Dict:
    return {k: v for k, v in flat_keys(to_dict(cfg)).items() if k not in NOT_CONTENT}


def model_facts(root: str, cfg: PrecomputeConfig, device: torch.device) -> dict:
    """The manifest's model fields, read from the component configs (no weights loaded)."""
    vae = read_json(os.path.join(root, "vae", "config.json"))
    clips = [read_json(os.path.join(root, n, "config.json")) for n in ("text_encoder", "text_encoder_2")]
    tok = os.path.join(root, "tokenizer", "tokenizer_config.json")
    clip_tokens = read_json(tok).get("model_max_length", 77) if os.path.exists(tok) else 77
    if cfg.text.t5_precision == "none":
        width = read_json(os.path.join(root, "transformer", "config.json"))["joint_attention_dim"]
    else:
        width = read_json(os.path.join(root, "text_encoder_3", "config.json"))["d_model"]
    used = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]
    if cfg.text.t5_precision != "none":
        used += ["text_encoder_3", "tokenizer_3"]
    return {
        "model": {"path": cfg.model.path, "revision": cfg.model.revision,
                  "components": {n: folder_fingerprint(os.path.join(root, n)) for n in used}},
        "vae": {"scaling_factor": vae["scaling_factor"], "shift_factor": vae.get("shift_factor") or 0.0,
                "downsample_factor": 2 ** (len(vae["block_out_channels"]) - 1)},
        "latent_channels": vae["latent_channels"],
        "embeddings": {"prompt_embeds_dim": width, "clip_tokens": min(int(clip_tokens), 77),
                       "pooled_dim": sum(c["projection_dim"] for c in clips)},
        "max_sequence_length": cfg.text.max_sequence_length,
        "precisions": {"clip": str(resolve_dtype(cfg.text.clip_precision, device)).replace("torch.", ""),
                       "t5": cfg.text.t5_precision,
                       "vae": str(resolve_dtype(cfg.vae.precision, device)).replace("torch.", "")},
        "flipped_latents": cfg.augment.flip,
        "clip_dim": sum(c["hidden_size"] for c in clips),
    }


def sample_spec(facts: dict, cfg: PrecomputeConfig) -> SampleSpec:
    """How this run stores its samples: the current format, CLIP at its own width, T5 unless it is not used,
    the latent std as out.latent_std says."""
    emb = facts["embeddings"]
    return SampleSpec(version=F.FORMAT_VERSION, clip_tokens=emb["clip_tokens"], t5_tokens=facts["max_sequence_length"],
                      width=emb["prompt_embeds_dim"], pooled_dim=emb["pooled_dim"],
                      latent_channels=facts["latent_channels"], clip_dim=facts["clip_dim"],
                      t5=cfg.text.t5_precision != "none", latent_std=cfg.out.latent_std)


class Plan:
    """Folder inputs cut into shards; shard i is inputs[i*n : (i+1)*n] whatever else happens."""

    def __init__(self, inputs: List[Item], per_shard: int):
        self.inputs, self.per_shard = inputs, per_shard
        self.n = max(1, math.ceil(len(inputs) / per_shard))

    def shard(self, i: int) -> List[Item]:
        return self.inputs[i * self.per_shard:(i + 1) * self.per_shard]

    def count(self, i: int) -> int:
        return len(self.shard(i))

    def items(self, i: int, cfg) -> Iterator[Item]:
        return iter(self.shard(i))

    def signature(self, i: int) -> list:
        return [it.signature() for it in self.shard(i)]


class TarPlan:
    """webdataset inputs: input tar i becomes shard i (read as a stream, so its size is not known ahead)."""

    def __init__(self, urls: List[str]):
        self.urls, self.n = urls, len(urls)

    def shard(self, i: int) -> List[Item]:
        return []  # nothing to compare item by item: the tar's signature stands for its samples

    def count(self, i: int):
        return None

    def items(self, i: int, cfg) -> Iterator[Item]:
        return stream_items(self.urls[i], cfg.data)

    def signature(self, i: int) -> list:
        return [tar_signature(self.urls[i])]


def _distributed(cfg: PrecomputeConfig):
    """Under torchrun / accelerate launch each process takes its own part and its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    part, parts, device = cfg.part, cfg.parts, cfg.device
    if world > 1 and parts == 1:
        part, parts = int(os.environ.get("RANK", "0")), world
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return part, parts, resolve_device("device", device)


def settle_offload(cfg: PrecomputeConfig, text: TextEncoders, vae: VaeEncoder, total_memory: int) -> bool:
    """offload auto, once every encoder is loaded (and waiting on the host): keep them all on the device when
    they fit in `total_memory` bytes with one VAE call's activations (faster), else leave them idle. True when
    they stay."""
    modules = [*text.modules, vae.vae]
    fits = encoders_fit(sum(map(weight_bytes, modules)), vae_activation_bytes(_largest_vae_call(cfg), vae.dtype),
                        total_memory)
    if fits:
        text.residency.keep_all(modules)
    return fits


def _largest_vae_call(cfg: PrecomputeConfig) -> int:
    """Pixels of the largest VAE call this config makes (vae.max_pixels, but at least one image)."""
    b = cfg.buckets
    return max(vae_batch(cfg.batch_size, cfg.vae.max_pixels, h, w) * h * w
               for h, w in make_buckets(b.resolution, b.step, b.min_aspect, b.max_aspect))


@dataclass(frozen=True)
class Outcome:
    """What one precompute command did: the set's manifest once it is complete (None while other parts are still
    to write their shards), this part's progress, and whether the set was already complete (nothing done)."""
    manifest: Optional[Manifest]
    progress: dict
    up_to_date: bool = False


def run(cfg: PrecomputeConfig) -> Outcome:
    """Do this part's shards."""
    t0 = time.time()
    part, parts, device = _distributed(cfg)
    with part_lock(cfg.out.dir, part, parts, cfg.out.overwrite):
        return _run_part(cfg, part, parts, device, t0)


def _run_part(cfg: PrecomputeConfig, part: int, parts: int, device, t0: float) -> Outcome:
    root = resolve_model(cfg.model.path, MODEL_FILES, cfg.model.revision)
    if is_webdataset(cfg.data.path):
        plan = TarPlan(expand(cfg.data.path))
        n_inputs = plan.n
    else:
        inputs = list_inputs(cfg.data, skip=[cfg.out.dir])
        if not inputs:
            raise DataError(f"data.path {cfg.data.path} holds no images (looked for {', '.join(IMAGE_EXTS)})")
        plan, n_inputs = Plan(inputs, cfg.out.samples_per_shard), len(inputs)
    facts = model_facts(root, cfg, device)
    spec = sample_spec(facts, cfg)
    del facts["clip_dim"]
    facts.update(format_version=spec.version, stored=spec.stored_json())  # how the shards store samples
    state = {"format_version": spec.version, "config": content_config(cfg), "components": facts["model"]["components"],
             "inputs": n_inputs,
             "shards": plan.n}
    mine = [i for i in range(plan.n) if i % parts == part]
    computed = {"numerics": numerics(device, cfg.text.t5_precision), "part": [part, parts]}
    todo = prepare_out_dir(cfg, state, plan, mine, facts, computed)
    if todo is None:
        return Outcome(read_manifest(cfg.out.dir), {}, up_to_date=True)
    need_extras = not os.path.exists(os.path.join(cfg.out.dir, F.EXTRAS))
    stats, load_seconds = {"images": 0, "seconds": 0.0}, 0.0
    if todo or need_extras:
        t_load = time.time()
        # Under offload auto each encoder goes to the host once loaded until all are there to be weighed, so a
        # GPU too small to hold them all still loads them.
        residency = Residency(device, idle=cfg.offload == "idle" or (cfg.offload == "auto" and device.type == "cuda"))
        text = TextEncoders.load(root, cfg.text.t5_precision, resolve_dtype(cfg.text.clip_precision, device), device,
                                 cfg.text.max_sequence_length, residency)
        if need_extras:
            _write_extras(cfg, text, computed["numerics"])
        if todo:
            vae = VaeEncoder.load(root, resolve_dtype(cfg.vae.precision, device), device, cfg.vae.max_pixels,
                                  residency)
            if cfg.offload == "auto" and device.type == "cuda":
                settle_offload(cfg, text, vae, torch.cuda.get_device_properties(device).total_memory)
            load_seconds = time.time() - t_load
            stats = encode_shards(cfg, plan, todo, text, vae, spec, computed)
            stats.update(offload="idle" if residency.idle else "none", encoder_switches=residency.switches)
    progress = {"part": part, "parts": parts, "shards_done_here": len(todo), "shards": plan.n,
                "seconds": round(time.time() - t0, 2), "seconds_loading_models": round(load_seconds, 2),
                "seconds_encoding": round(stats["seconds"], 2), "images": stats["images"],
                "images_per_second": round(stats["images"] / max(stats["seconds"], 1e-9), 2),
                **{k: stats[k] for k in ("offload", "encoder_switches") if k in stats},
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        progress["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    manifest = assemble(cfg.out.dir, plan.n, {**facts, "stats": progress, "config": to_dict(cfg)}, cfg.out.dtype)
    if manifest is None:
        here = [i for i in range(plan.n) if read_sidecar(cfg.out.dir, i) is not None]
        progress["shards_complete"] = len(here)
        progress["other_parts_here"] = any(i % parts != part for i in here)
        return Outcome(None, progress)
    if manifest.counts.written == 0:
        os.remove(os.path.join(cfg.out.dir, F.MANIFEST))  # a set with nothing in it is no set
        reasons = ", ".join(f"{r}: {n}" for r, n in manifest.rejected_reasons.items())
        raise DataError(f"no usable images in {cfg.data.path} ({manifest.counts.rejected} rejected: {reasons}); "
                        f"reasons are in {os.path.join(cfg.out.dir, F.REJECTED)}")
    return Outcome(manifest, progress)


def _write_extras(cfg: PrecomputeConfig, text: TextEncoders, computed_with: dict) -> None:
    prompts = list(cfg.validation.prompts)
    (empty_embeds, empty_pooled), *val = text.encode_batches([[""]] + ([prompts] if prompts else []))
    val_embeds, val_pooled = val[0] if val else (empty_embeds[:0], empty_pooled[:0])
    write_extras(cfg.out.dir, {"empty_prompt_embeds": empty_embeds[0], "empty_pooled_prompt_embeds": empty_pooled[0],
                               "validation_prompt_embeds": val_embeds, "validation_pooled_prompt_embeds": val_pooled},
                 cfg.out.dtype, {"validation_prompts": prompts, "numerics": computed_with})


def summary(outcome: Outcome, out_dir: str) -> str:
    m, result = outcome.manifest, outcome.progress
    if outcome.up_to_date:
        return (f"precompute: up to date: {out_dir} holds the complete shard set this command makes "
                f"({m.counts.written} samples in {len(m.shards)} shard(s); same config, model and inputs); set "
                "out.overwrite=true to rebuild it")
    if m is None:
        head = (f"part {result['part']} of {result['parts']} done ({result['shards_done_here']} shard(s) written here, "
                f"{result['seconds']} s); {result.get('shards_complete', '?')} of {result['shards']} shards are in {out_dir}")
        if result.get("other_parts_here"):
            return head + "; the set completes when the other parts finish writing into this folder"
        # Nothing here shows whether the other parts share this folder or write their own.
        return (head + ". If the other parts write into this same out.dir, the set completes when the last one "
                f"finishes; if each part has its own out.dir, join them once all have run: "
                f"python -m shards combine SET_DIR {out_dir} OTHER_PART_DIR...")
    c = m.counts
    lines = [f"shard set: {out_dir}  ({c.written} samples in {len(m.shards)} shard(s), "
             f"{c.rejected} rejected of {c.seen} seen, {result['seconds']} s)"]
    if m.rejected_reasons:
        lines.append("  rejected: " + ", ".join(f"{r}: {n}" for r, n in m.rejected_reasons.items())
                     + f"  (details in {os.path.join(out_dir, 'rejected.jsonl')})")
    t = m.truncated_captions
    if t.get("clip") or t.get("t5"):
        lines.append(f"  truncated captions: {t.get('clip', 0)} longer than CLIP's {m.embeddings.clip_tokens} "
                     f"tokens, {t.get('t5', 0)} longer than max_sequence_length {m.max_sequence_length}")
    return "\n".join(lines)
