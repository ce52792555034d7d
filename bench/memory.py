"""Modelled GPU memory of one LoRA training step at the published model sizes, on a fake GPU: the rows
`make bench ARGS="--rows modelled"` prints (`python -m bench.memory` alone). A model, not a measurement.

Method: the full-size transformer is built on fake CUDA (shards.fake_cuda: real configs, real diffusers and
peft code, no weights allocated); the run's own step (train.fake_gpu.lora_step) runs twice and the second
step's peak of live bytes is taken (shards.fake_cuda.LiveBytes: every storage on the device, rounded up to the
CUDA caching allocator's 512-byte blocks; what `torch.cuda.max_memory_allocated` counts). Attention runs the
kernel an H100 picks (flash for bf16).

nf4 bases: bitsandbytes cannot run on fake tensors, so each quantized linear is `ModelledLinear4bit`: the
packed 4-bit weight and its statistics at bitsandbytes' sizes (blocksize 64, nested statistics), and a
forward and backward that hold a dequantized copy of the weight in the compute dtype only for the matmul
and save nothing of the input, as bitsandbytes' `MatMul4Bit` saves nothing for a frozen weight; the output
is in the compute dtype, as the trainer's `Linear4bitInComputeDtype` returns it (`out_in_compute_dtype=False`:
cast back to the input's dtype, as bitsandbytes' own `Linear4bit.forward` does); see
bench.modelled_layers.ModelledLinear4bit.

Blind spots, added as the explicit `MARGIN_*` of shards.gpu_margins rather than silently: the CUDA context
(0.3-0.5 GiB, outside the allocator), the caching allocator's rounding beyond 512 B and its fragmentation
(reserved vs allocated; typically 5-15% in training), cuDNN / cuBLAS workspaces (cuBLAS keeps a few MiB per
stream).
"""
import argparse
import contextlib
import time
from typing import Iterator, List, Optional

import torch

from shards.gpu_margins import GIB, MARGIN_ALLOCATOR, MARGIN_CONTEXT, MIB

from .matrix import QUICK_MODELLED, add_matrix_args, modelled_matrix, models_named, settle_matrix_args
from .measure import TRANSFORMER_CONFIGS
from .modelled_layers import ModelledAdamW8bit, ModelledLinear4bit, ModelledLinear8bit
from .results import table_cells
from .row import Row
from .stage import add_json_arg, reported

TEXT_TOKENS = 77 + 256


def quantize_for_model(transformer, compute_dtype: torch.dtype, out_in_compute_dtype: bool = True) -> int:
    """Replace the linears inside transformer blocks (those `train.model.quantize_blocks` quantizes)."""
    n = 0
    for name, parent in list(transformer.named_modules()):
        if not name.startswith("transformer_blocks."):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, child_name, ModelledLinear4bit(child, compute_dtype, out_in_compute_dtype))
                n += 1
    return n


def quantize_int8_for_model(transformer, keeps_input: bool, compute_dtype: torch.dtype) -> None:
    for name, parent in list(transformer.named_modules()):
        if not name.startswith("transformer_blocks."):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, child_name, ModelledLinear8bit(child, keeps_input, None if keeps_input else compute_dtype))


def modelled_row(model: str, resolution: int, batch: int, checkpointing: bool, quantize: str = "none",
                 text_tokens: int = TEXT_TOKENS, rank: int = 16, nf4_out: str = "compute",
                 int8_layer: str = "trainer") -> Row:
    """One modelled row: the step's peak of live bytes on the GPU, what is held between steps, the margin."""
    from diffusers import SD3Transformer2DModel

    from shards.fake_cuda import FakeCuda

    from train.fake_gpu import CUDA, lora_step
    from train.synthetic import bench_config

    if quantize not in ("none", "nf4", "int8"):
        raise ValueError(f"modelled rows cover bf16, nf4 and int8 bases, not {quantize}")
    t0 = time.perf_counter()
    cfg = bench_config(quantize, checkpointing, batch, rank)
    cfg.model.precision = cfg.train.mixed_precision = "bf16"
    with FakeCuda():
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIGS[model]).requires_grad_(False)
        if quantize == "nf4":
            # Before the move, as training quantizes. nf4_out="input": bitsandbytes' own Linear4bit output dtype.
            quantize_for_model(transformer, torch.bfloat16, nf4_out == "compute")
        elif quantize == "int8":  # int8_layer="bitsandbytes": its own Linear8bitLt, which keeps each input
            quantize_int8_for_model(transformer, int8_layer == "bitsandbytes", torch.bfloat16)
        transformer.to(CUDA, torch.bfloat16)
        r = lora_step(transformer, cfg, resolution, text_tokens, memory=True)
    peak = r.peak_bytes
    total = peak * (1 + MARGIN_ALLOCATOR) + MARGIN_CONTEXT
    settings = {"model": model, "resolution": resolution, "batch": batch,
                "base_dtype": quantize if quantize != "none" else "bf16", "checkpointing": checkpointing,
                **({"nf4_output": nf4_out} if quantize == "nf4" else {}),
                **({"int8_layer": int8_layer} if quantize == "int8" else {}),
                "lora_rank": rank, "lora_targets": "attn", "optimizer": "adamw", "text_tokens": text_tokens,
                "device": "fake cuda (modelled)"}
    return Row.of("modelled", f"modelled LoRA step on fake CUDA, {model} at full size", settings, status="modelled",
                  modelled_peak_mb=peak / MIB, modelled_held_mb=r.held_bytes / MIB, modelled_total_mb=total / MIB,
                  margin=f"+{MARGIN_ALLOCATOR:.0%} allocator, +{MARGIN_CONTEXT / GIB:.1f} GiB CUDA context",
                  model_seconds=time.perf_counter() - t0)


@contextlib.contextmanager
def modelled_full_optimizers():
    """The full-mode optimizers as the model runs them on fake CUDA: bitsandbytes' 8-bit AdamW as
    `ModelledAdamW8bit`, and the stochastic rounding's draws from the global generator, as fake CUDA has no
    generator object (a generator holds no device memory)."""
    from train import bf16_optim, optim

    plain, saved = optim._plain_optimizer, bf16_optim.WeightByWeight._generator

    def modelled(params, t):
        if t.optimizer == "adamw8bit":
            return ModelledAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
        return plain(params, t)

    optim._plain_optimizer = modelled
    bf16_optim.WeightByWeight._generator = lambda self, device: None
    try:
        yield
    finally:
        optim._plain_optimizer = plain
        bf16_optim.WeightByWeight._generator = saved


def modelled_full_row(model: str, resolution: int, batch: int, checkpointing: bool, optimizer: str, fused: bool,
                      text_tokens: int = TEXT_TOKENS) -> Row:
    """One modelled full fine-tuning step (train.mode=full, every weight trained, bf16 weights updated by
    stochastic rounding; optionally the fused backward step): peak of live bytes, what is held, the margin."""
    from diffusers import SD3Transformer2DModel

    from shards.fake_cuda import FakeCuda

    from train.fake_gpu import CUDA, lora_step
    from train.synthetic import bench_config

    t0 = time.perf_counter()
    cfg = bench_config("none", checkpointing, batch)
    cfg.model.precision = cfg.train.mixed_precision = "bf16"
    cfg.train.mode, cfg.train.optimizer, cfg.train.fused_step = "full", optimizer, fused
    with FakeCuda(), modelled_full_optimizers():
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIGS[model]).requires_grad_(False)
        transformer.to(CUDA, torch.bfloat16)
        r = lora_step(transformer, cfg, resolution, text_tokens, memory=True)
    peak = r.peak_bytes
    total = peak * (1 + MARGIN_ALLOCATOR) + MARGIN_CONTEXT
    settings = {"model": model, "resolution": resolution, "batch": batch, "base_dtype": "bf16",
                "checkpointing": checkpointing, "mode": "full", "optimizer": optimizer, "fused_step": fused,
                "text_tokens": text_tokens, "device": "fake cuda (modelled)"}
    return Row.of("modelled", f"modelled full fine-tuning step on fake CUDA, {model} at full size", settings,
                  status="modelled", modelled_peak_mb=peak / MIB, modelled_held_mb=r.held_bytes / MIB,
                  modelled_total_mb=total / MIB,
                  margin=f"+{MARGIN_ALLOCATOR:.0%} allocator, +{MARGIN_CONTEXT / GIB:.1f} GiB CUDA context",
                  model_seconds=time.perf_counter() - t0)


def host_check(config: dict, resolution: int, batch: int, checkpointing: bool, text_tokens: int = 77 + 77,
               rank: int = 16) -> dict:
    """The memory model checked against a real run: the same fp32 LoRA step on the CPU, once on fake tensors
    (the model) and once for real, each second step's peak of live bytes counted the same way.

    Both use SDPA's math kernel: on fake tensors SDPA's kernel choice is not made by the CPU, so the two
    would otherwise run different attention kernels. What this checks is the method (tensor lifetimes,
    shapes, the step's own allocations), not the allocator: a real run's allocator adds its own rounding
    and caching, which is what the margins stand for."""
    import contextlib

    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shards.fake_cuda import FakeHost

    from train.fake_gpu import lora_step
    from train.synthetic import bench_config

    cpu = torch.device("cpu")
    out = {}
    for kind in ("modelled", "observed"):
        cfg = bench_config("none", checkpointing, batch, rank)
        cfg.model.precision, cfg.train.mixed_precision = "fp32", "no"
        torch.manual_seed(0)
        with sdpa_kernel(SDPBackend.MATH), FakeHost() if kind == "modelled" else contextlib.nullcontext():
            transformer = SD3Transformer2DModel(**config).requires_grad_(False)
            r = lora_step(transformer, cfg, resolution, text_tokens, memory=True, device=cpu)
        out[kind] = r.peak_bytes
    out["ratio"] = out["modelled"] / out["observed"]
    return out



def modelled_validation(model: str = "sd3-medium", resolution: int = 1024, text_tokens: int = TEXT_TOKENS,
                        tiled: bool = True, vae_config: Optional[dict] = None) -> Row:
    """What a validation image adds to the GPU on top of what training holds between steps: the sampler's
    guided denoising step (inference, batch 2 for guidance) and the VAE decoder, which goes to the GPU only
    while it decodes one image at a time, tiled, in bf16 (train.sampling). Peaks of live bytes beyond the
    held state, each modelled alone (they run one after the other)."""
    from .measure import SD3_VAE

    denoise = modelled_denoise(model, resolution, text_tokens) if model else 0
    vae_config = vae_config or SD3_VAE
    decoder = modelled_decode(vae_config, resolution, tiled)
    return Row.of("modelled", f"modelled validation image on fake CUDA, {model}",
                  {"model": model, "resolution": resolution, "batch": 1, "base_dtype": "bf16",
                   "part": "validation", "validation_tile": 512 if tiled else vae_config["sample_size"],
                   "device": "fake cuda (modelled)"},
                  status="modelled", modelled_denoise_mb=denoise / MIB, modelled_decode_mb=decoder / MIB,
                  modelled_peak_mb=max(denoise, decoder) / MIB,
                  modelled_total_mb=max(denoise, decoder) * (1 + MARGIN_ALLOCATOR) / MIB,
                  margin=f"+{MARGIN_ALLOCATOR:.0%} allocator (the context is already counted in the step's row)")


def modelled_denoise(model: str, resolution: int, text_tokens: int = TEXT_TOKENS) -> int:
    """Bytes beyond the transformer's own weights of one guided denoising step at `resolution`."""
    from diffusers import SD3Transformer2DModel

    from shards.fake_cuda import FakeCuda, LiveBytes, StepAudit

    from train.fake_gpu import CUDA, denoise_step

    with FakeCuda():
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIGS[model]).requires_grad_(False).to(CUDA, torch.bfloat16)
        weights = sum(x.untyped_storage().nbytes() for x in list(transformer.parameters()) + list(transformer.buffers()))
        live = LiveBytes()
        with live:
            denoise_step(transformer, resolution, text_tokens, StepAudit(), torch.bfloat16)
    return live.peak - weights


def modelled_decode(vae_config: dict, resolution: int, tiled: bool = True) -> int:
    """Peak bytes of the bf16 VAE decoder (its weights included) decoding one `resolution`² image, as
    train.sampling does (tiled: its 512² tiles; else diffusers' own tile size, the config's sample_size)."""
    from diffusers import AutoencoderKL

    from shards.fake_cuda import FakeCuda, LiveBytes

    from train.fake_gpu import CUDA
    from train.sampling import decode_one, tiled_for_validation

    with FakeCuda():
        vae = AutoencoderKL(**vae_config)
        vae.encoder = None
        vae.requires_grad_(False)
        if tiled:
            tiled_for_validation(vae)
        else:
            vae.enable_tiling()
        vae.to(torch.bfloat16)
        live = LiveBytes()
        with live, torch.no_grad():
            vae.to(CUDA)
            f = 2 ** (len(vae_config["block_out_channels"]) - 1)
            decode_one(vae, torch.zeros(1, vae_config["latent_channels"], resolution // f, resolution // f), CUDA)
    return live.peak


def rows(quick: bool, models: List[str], resolutions: List[int], batches: List[int], bases: List[str]) -> Iterator[Row]:
    """The modelled rows of the matrix (--quick: the tiny model's), then, at full size, what a validation image
    adds at the largest resolution asked for."""
    matrix = QUICK_MODELLED if quick else modelled_matrix(models_named(models), resolutions, batches, bases)
    for s in matrix:
        yield modelled_row(**s)
    # Full fine-tuning of one GPU's worth: 8-bit AdamW with and without the fused step, checkpointing, 1024².
    full = [("tiny", 128)] if quick else [(m, 1024) for m in dict.fromkeys(s["model"] for s in matrix)
                                          if m in ("sd3-medium", "sd3.5-large")]
    for m, res in full:
        for fused in (True, False):
            yield modelled_full_row(m, res, 1, True, "adamw8bit", fused)
    if not quick:
        for m in dict.fromkeys(s["model"] for s in matrix):
            yield modelled_validation(m, max(resolutions))


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model (a check of the method, seconds)")
    add_matrix_args(ap)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    settle_matrix_args(a)
    reported(rows(a.quick, a.models, a.resolutions, a.batches, a.bases), a.json, lambda r: "  ".join(table_cells(r)))


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.memory", main)
