"""Modelled GPU memory of precompute's encoding at real component sizes, on a fake GPU: a model, not a
measurement (`python -m bench.precompute_memory`; `make bench ARGS="--rows modelled"` runs it too).

The full-size CLIP-L, CLIP-G, T5-XXL and SD3 VAE encoder (bench.precompute's configs) are built in the dtypes
precompute loads them in and run through the stage's own `TextEncoders.encode_batches` and `VaeEncoder.encode`
on fake CUDA (shards.fake_cuda), with the stage's `Residency` deciding what is on the device: every encoder
(`offload: none`) or only the one running (`offload: idle`, the others moved to the host). Work is done as
precompute orders it: each batch VAE-encoded as it comes, then a group of batches' captions text-encoded. The
peak of live bytes (512-byte blocks) is taken per phase. T5 in nf4 as transformers loads it: every linear
layer quantized (bitsandbytes' layout, `ModelledLinear4bit`, output in the input's dtype) except the
feed-forward output layers `wo`, which transformers keeps out of quantization, in the compute dtype.
The CUDA context and the allocator's fragmentation are not in the live bytes; they are added as the
memory models' explicit margins (`modelled_total_mb`). The time the switches take is not modelled (a GPU
measures it: `make gpu-check`).
"""
import argparse
import json
import sys
import tempfile
from typing import Optional

import torch

from shards.fake_cuda import FakeCuda, LiveBytes
from shards.gpu_margins import MARGIN_ALLOCATOR, MARGIN_CONTEXT, MIB

from .modelled_layers import ModelledLinear4bit
from .row import Row
from .stage import add_json_arg, reported

CUDA = torch.device("cuda", 0)


def _t5_in_nf4(t5, compute_dtype: torch.dtype) -> None:
    for name, parent in list(t5.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child_name != "wo":
                setattr(parent, child_name, ModelledLinear4bit(child, compute_dtype, out_in_compute_dtype=False))


def _on_device(modules) -> list:
    return [x for m in modules for x in list(m.parameters()) + list(m.buffers()) if x.device.type == "cuda"]


def modelled_encode(resolution: int = 1024, batch: int = 1, t5_precision: str = "nf4",
                    vae_dtype: torch.dtype = torch.float32, clip_dtype: torch.dtype = torch.float16,
                    t5_tokens: int = 256, offload: str = "none", group: int = 2) -> Row:
    """Peak live bytes of the VAE phase and of the text phase over `group` batches of `batch` images, the
    second time round (so that under `offload: idle` every encoder has been switched in and out once)."""
    from precompute.encoders import Residency, TextEncoders, VaeEncoder, weight_bytes
    from precompute.tiny import build_clip_tokenizer, build_t5_tokenizer

    from .precompute import captions, component

    compute = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok, t5_tok = build_clip_tokenizer(f"{tmp}/clip"), build_t5_tokenizer(f"{tmp}/t5")
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
               pad_token_id=clip_tok.pad_token_id)
    with FakeCuda():  # everything built under it is fake: the host tensors too, so nothing is initialised
        clips = [component(n, "cpu", ids).to(clip_dtype) for n in ("text_encoder", "text_encoder_2")]
        t5 = component("text_encoder_3", "cpu")
        if t5_precision == "nf4":
            _t5_in_nf4(t5, compute)
        t5 = t5.to(compute)
        vae = component("vae", "cpu")
        vae.decoder = None
        vae = vae.to(vae_dtype)
        modules = [*clips, t5, vae]
        sizes = dict(zip(("clip_l", "clip_g", "t5", "vae_encoder"), map(weight_bytes, modules)))
        residency = Residency(CUDA, idle=offload == "idle")
        if offload != "idle":
            residency.keep_all(modules)
        text = TextEncoders([clip_tok, clip_tok], clips, t5_tok, t5, t5.config.d_model, t5_tokens, CUDA, residency)
        vae_enc = VaeEncoder(vae, vae_dtype, CUDA, resolution * resolution, residency)
        pixels = torch.zeros(batch, 3, resolution, resolution)
        prompts = [captions(batch)] * group
        live = LiveBytes()
        live.hold(_on_device(modules))
        peaks = {}
        with live:
            for _ in range(2):
                live.reset_peak()
                for _ in range(group):
                    mean, std = (t.cpu() for t in vae_enc.encode(pixels))
                peaks["vae"] = live.peak
                live.reset_peak()
                text.encode_batches(prompts)
                peaks["text"] = live.peak
    return Row.of(
        "modelled", "modelled precompute encoders on fake CUDA, SD3 sizes",
        {"model": "sd3 encoders", "resolution": resolution, "batch": batch,
         "base_dtype": f"t5 {t5_precision}, clip {str(clip_dtype)[6:]}, vae {str(vae_dtype)[6:]}",
         "t5_tokens": t5_tokens, "offload": offload, "device": "fake cuda (modelled)"},
        status="modelled", modelled_weights_mb={k: v / MIB for k, v in sizes.items()},
        modelled_text_peak_mb=peaks["text"] / MIB, modelled_vae_peak_mb=peaks["vae"] / MIB,
        modelled_peak_mb=max(peaks.values()) / MIB,
        modelled_total_mb=(max(peaks.values()) * (1 + MARGIN_ALLOCATOR) + MARGIN_CONTEXT) / MIB,
        margin=f"+{MARGIN_ALLOCATOR:.0%} allocator, +{MARGIN_CONTEXT / 2**30:.1f} GiB CUDA context",
        encoder_switches=residency.switches)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.precompute_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    add_json_arg(ap)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    rows = (modelled_encode(a.resolution, a.batch, vae_dtype=vae_dtype, offload=offload)
            for vae_dtype in (torch.float32, torch.bfloat16) for offload in ("none", "idle"))
    reported(rows, a.json, lambda r: json.dumps(r.to_json()))


if __name__ == "__main__":
    main()
