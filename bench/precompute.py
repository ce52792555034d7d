"""Precompute throughput: the stage's own `TextEncoders` and `VaeEncoder` on random-weight models.

`sd3`: full-size components with the real SD3 configs (CLIP-L, OpenCLIP bigG, the T5-v1.1-XXL encoder,
the 16-channel VAE) and random weights, written as a pipeline folder in a temporary directory and loaded
back by the stage's loaders, T5 in nf4 through the same `from_pretrained` + bitsandbytes path that
`text.t5_precision: nf4` takes. GPU only: T5-XXL alone has 4.76B parameters. The tokenizers are the small
ones `precompute.tiny` trains (the real vocabularies cannot be had offline); their ids fall inside the real
vocabularies and every sequence is padded to the same length as with the real ones, so the encoders do the
same work. `tiny`: the built-in tiny pipeline, so the harness runs on a CPU in tests.

Rows are `bench.row.Row`s (`python -m bench --rows precompute` runs this module); one row per batch size, all from
one loading of the encoders. Peak memory is reported for the whole row, per stage (text encoders, VAE
encoder) and per component (CLIP-L, CLIP-G, T5, VAE encoder: the peak while it runs), with the weight
memory of each component.
"""
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from shards.common.dtypes import STORAGE_DTYPES
from shards.common.errors import UsageError
from shards.gpu_margins import MIB

from .measure import CLIP_G, CLIP_L, SD3_VAE, T5_XXL, PeakMemory, max_peak, release, sync, timed_calls, unless_oom
from .row import Row
from .stage import add_json_arg, reported

# Real SD3 component configs (the published config files of the SD3 and SD3.5 repositories).
_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
MAX_SEQUENCE_LENGTH = 256  # the SD3 pipeline's T5 length, so the embeddings match the train rows' 77 + 256 tokens
GPU_BATCHES = (1, 4, 16)
GROUP_BATCHES = 4  # batches per timed group with idle encoders on the host


def _weights_mb(module: torch.nn.Module) -> float:
    """Bytes of parameters and buffers (packed 4-bit weights count as stored)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


# ---------------------------------------------------------------- the models

def component(sub: str, device, clip_ids: Optional[dict] = None) -> torch.nn.Module:
    """One random-weight SD3 component by its pipeline folder name, built on `device` (a GPU initialises
    T5-XXL in seconds; "meta" builds none of it); CLIP and T5 in bf16 (the loaders cast them), the VAE in fp32.
    `clip_ids`: bos/eos/pad token ids of the CLIP tokenizer (CLIP pools at the end-of-text token)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    ids = clip_ids or {}
    builders = {
        "text_encoder": (torch.bfloat16, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids))),
        "text_encoder_2": (torch.bfloat16, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids))),
        "text_encoder_3": (torch.bfloat16, lambda: T5EncoderModel(T5Config(**T5_XXL))),
        "vae": (torch.float32, lambda: AutoencoderKL(**SD3_VAE)),
    }
    dtype, build = builders[sub]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build().eval()
    finally:
        torch.set_default_dtype(default)


def write_pipeline(name: str, root: str, device: torch.device) -> str:
    """Write `name`'s encoders, tokenizers and VAE as the pipeline folder the precompute loaders read."""
    from precompute.tiny import build_clip_tokenizer, build_t5_tokenizer, build_tiny_model

    if name == "tiny":
        return build_tiny_model(root)
    if name != "sd3":
        raise UsageError(f"unknown encoder set '{name}'; known: sd3, tiny")
    os.makedirs(root, exist_ok=True)
    clip_tok = build_clip_tokenizer(os.path.join(root, "tokenizer"))
    build_clip_tokenizer(os.path.join(root, "tokenizer_2"))
    build_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
               pad_token_id=clip_tok.pad_token_id)
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):  # one at a time: T5 alone is 9.5 GB
        m = component(sub, device, ids)
        m.save_pretrained(os.path.join(root, sub))
        del m
        release(device)
    return root


# ---------------------------------------------------------------- the rows

def captions(n: int) -> List[str]:
    from precompute.tiny import CAPTIONS

    texts = list(CAPTIONS.values())
    return [texts[i % len(texts)] for i in range(n)]


def encode_rows(name: str, root: str, batches: Sequence[int], resolution: int, device, t5_precision: str = "nf4",
                max_sequence_length: int = MAX_SEQUENCE_LENGTH, steps: int = 3, warmup: int = 1,
                offload: str = "none") -> List[Row]:
    """Load the encoders from `root` the way precompute does, then one row per batch size. `offload`: "none"
    (every encoder resident) or "idle" (each on the device only while it runs, as precompute's `offload: idle`)."""
    from precompute.config import TextConfig, VaeConfig
    from precompute.encoders import Residency, TextEncoders, VaeEncoder, resolve_dtype

    device = torch.device(device)
    if resolution <= 0 or resolution % 16:
        raise UsageError(f"resolution {resolution} must be a positive multiple of 16")
    clip_dtype = resolve_dtype(TextConfig.clip_precision, device)
    vae_dtype = resolve_dtype(VaeConfig.precision, device)
    release(device)
    mem = PeakMemory(device)
    t0 = time.perf_counter()
    residency = Residency(device, idle=offload == "idle")
    text = TextEncoders.load(root, t5_precision, clip_dtype, device, max_sequence_length, residency)
    vae = VaeEncoder.load(root, vae_dtype, device, VaeConfig.max_pixels, residency)
    sync(device)
    load = {"load_seconds": time.perf_counter() - t0, **{f"load_{k}": v for k, v in mem.read().items()}}
    weights = {"clip_l": _weights_mb(text.clips[0]), "clip_g": _weights_mb(text.clips[1]),
               "t5": _weights_mb(text.t5) if text.t5 is not None else 0.0, "vae_encoder": _weights_mb(vae.vae)}
    settings = {"model": f"{name} encoders", "resolution": resolution,
                "base_dtype": f"t5 {t5_precision}, clip {_NAMES[clip_dtype]}, vae {_NAMES[vae_dtype]}",
                "max_sequence_length": max_sequence_length, "vae_max_pixels": VaeConfig.max_pixels,
                "offload": offload,
                "steps": steps, "warmup": warmup,
                "device": str(device)}
    rows = []
    for b in batches:
        rows.append(_batch_row(text, vae, b, resolution, device, steps, warmup,
                               {**settings, "batch": b}, {**load, "weights_mb": weights}))
    del text, vae
    release(device)
    return rows


def _batch_row(text, vae, batch: int, resolution: int, device, steps: int, warmup: int, settings: dict,
               extra: dict) -> Row:
    what = "precompute TextEncoders.encode + VaeEncoder.encode on random images and captions"
    stages = unless_oom(lambda: _measure_batch(text, vae, batch, resolution, device, steps, warmup), device)
    if stages is None:
        return Row("precompute", what, settings, status="OOM", extra=extra)
    if "group" in stages:
        # A group of GROUP_BATCHES batches paid one round of switches; precompute pays one per offload_group
        # images, so the batch's share of a round is batch / offload_group of it.
        from precompute.config import PrecomputeConfig

        round_s, group = stages["switches"]["seconds"], PrecomputeConfig.offload_group
        seconds = (stages["group"]["seconds"] - round_s) / GROUP_BATCHES + round_s * batch / group
        peak = max_peak(stages["group"]["peak"], stages["switches"]["peak"])
        extra = {**extra, "switch_round_seconds": round_s, "offload_group": group, "group_batches": GROUP_BATCHES}
    else:
        seconds = stages["text"]["seconds"] + stages["vae"]["seconds"]
        peak = max_peak(stages["text"]["peak"], stages["vae"]["peak"])
    return Row.of("precompute", what, settings, status="ok", seconds=seconds, images_per_s=batch / seconds, **peak,
                  stages=stages, **extra)


def _measure_batch(text, vae, batch: int, resolution: int, device, steps: int, warmup: int) -> dict:
    """Median seconds and peak memory of each stage on one batch, as precompute runs them: every encoder
    resident, text then VAE; or, with idle encoders on the host, GROUP_BATCHES batches VAE-encoded one by one
    and then their captions text-encoded (one round of switches), beside one round of switches alone."""
    g = torch.Generator().manual_seed(batch)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1  # as the loader hands them over
    prompts = captions(batch)
    text_parts = {"clip_l": text.clips[0], "clip_g": text.clips[1], "t5": text.t5}
    if text.residency.idle:
        def group():
            for _ in range(GROUP_BATCHES):
                vae.encode(pixels)
            text.encode_batches([prompts] * GROUP_BATCHES)

        stages = (("group", group, {**text_parts, "vae_encoder": vae.vae.encoder}),
                  ("switches", lambda: [text.residency.use(m) for m in (*text.modules, vae.vae)], {}))
    else:
        stages = (("text", lambda: text.encode(prompts), text_parts),
                  ("vae", lambda: vae.encode(pixels), {"vae_encoder": vae.vae.encoder}))
    out = {}
    for stage, fn, parts in stages:
        release(device, collect=False)
        mem = PeakMemory(device)
        times = timed_calls(fn, device, warmup, steps)
        out[stage] = {"seconds": statistics.median(times), "times": times, "peak": mem.read(),
                      "component_peaks": _component_peaks(fn, parts, device)}
    return out


def _component_peaks(fn: Callable, parts: Dict[str, Optional[torch.nn.Module]], device) -> Dict[str, dict]:
    """Peak memory while each component runs (its weights, every other resident model, its activations):
    one more, untimed call, with the peak reset as each component starts."""
    peaks, hooks, mem = {}, [], PeakMemory(device)

    def start(*_):
        mem.reset()

    def finish(name):
        def hook(*_):  # returns None: a forward hook's return value would replace the module's output
            peaks.setdefault(name, mem.read())
        return hook

    for name, module in parts.items():
        if module is None:  # no T5 (t5_precision: none)
            continue
        hooks += [module.register_forward_pre_hook(start), module.register_forward_hook(finish(name))]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return peaks


def rows(quick: bool, device=None, tiny_model: Optional[str] = None, batches: Optional[Sequence[int]] = None,
         steps: Optional[int] = None, warmup: int = 1, offload: str = "none") -> List[Row]:
    """The precompute rows: `sd3` at 1024² (needs a GPU), or with `quick` the tiny pipeline at 128²
    and T5 length 77 (`tiny_model`: an existing tiny pipeline folder; else one is built in a temporary folder)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, resolution = ("tiny", 128) if quick else ("sd3", 1024)
    batches = batches or ((2,) if quick else GPU_BATCHES)
    steps = steps or (2 if quick else 3)
    length = 77 if quick else MAX_SEQUENCE_LENGTH  # quick: precompute's default T5 length
    if tiny_model and quick:
        return encode_rows(name, tiny_model, batches, resolution, device, max_sequence_length=length, steps=steps,
                           warmup=warmup, offload=offload)
    if not quick and device.type != "cuda":
        raise UsageError("the full-size precompute rows need a CUDA GPU (T5-XXL alone is 4.76B parameters); "
                         "use --quick for the tiny version")
    tmp = tempfile.mkdtemp(prefix="shardtune-bench-")
    try:
        root = write_pipeline(name, os.path.join(tmp, name), device)
        return encode_rows(name, root, batches, resolution, device, max_sequence_length=length, steps=steps,
                           warmup=warmup, offload=offload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: List[str]):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.precompute", description="Precompute throughput and peak "
                                 "memory on random-weight full-size SD3 encoders (CUDA) or, --quick, the tiny ones.")
    ap.add_argument("--quick", action="store_true", help="the tiny pipeline at 128² (runs on a CPU)")
    ap.add_argument("--tiny-model", default=None, help="--quick: an existing tiny pipeline folder (default: build one)")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default: 1,4,16; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed batches per row (default 3; --quick 2)")
    ap.add_argument("--offload", choices=("none", "idle"), default="none",
                    help="idle: each encoder on the GPU only while it runs, as precompute's offload: idle")
    add_json_arg(ap)
    return ap.parse_args(argv)


def main(argv: List[str]) -> None:
    a = parse_args(argv)
    try:
        batches = [int(b) for b in a.batches.split(",")] if a.batches else None
    except ValueError:
        raise UsageError(f"--batches: '{a.batches}' is not a comma list of whole numbers") from None
    if (batches is not None and min(batches) < 1) or (a.steps is not None and a.steps < 1):
        raise UsageError("--batches and --steps need positive numbers")
    reported(rows(a.quick, tiny_model=a.tiny_model, batches=batches, steps=a.steps, offload=a.offload), a.json, _show)


def _show(r: Row) -> str:
    s = r.settings
    peak = r.peak_mem_mb if r.peak_mem_mb is not None else r.peak_rss_mb
    idle = ", idle encoders on the host" if s["offload"] == "idle" else ""
    return (f"precompute {s['model']}{idle}, {s['resolution']}², batch {s['batch']}: "
            + ("OOM" if r.status == "OOM" else f"{r.images_per_s:.3g} images/s, peak {peak:.0f} MiB"))


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.precompute", main)
