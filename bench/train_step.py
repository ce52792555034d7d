"""The train rows of `make bench`: one LoRA step of the trainer's own code on random-weight SD3 transformers.

`python -m bench.train_step [--quick] [--full] [--models ...] [--resolutions ...] [--batches ...] [--bases ...]
[--steps N] [--warmup N] [--json FILE]` prints a line per row; `python -m bench --rows train` runs it and
puts the rows in the table. Each row is one LoRA step (`TrainStep`: flow loss, AdamW) on a transformer
built at a published config with random weights (quantized as the trainer's loader leaves it), fed one
random batch of the real shapes again and again: peak memory, median step time, samples/s, FLOPs and MFU.
`--full`: full fine-tuning steps instead, with and without the fused backward step.
"""
import argparse
import statistics
from typing import Iterator, List, Optional

import torch

from train.synthetic import BENCH_MANIFEST, LORA_RANK, SD3_SCHEDULER, bench_config, random_batch

from .flops import TEXT_TOKENS, forward_flops, matmul_peak_flops, train_step_flops
from .matrix import QUICK_MATRIX, add_matrix_args, check_train_settings, model_config, models_named, \
    settle_matrix_args, train_matrix
from .measure import PeakMemory, default_device, device_name, release, timed_calls, unless_oom
from .results import table_cells
from .row import Row
from .stage import add_json_arg, reported


def build_transformer(name: str, dtype: torch.dtype, device, quantize: str = "none"):
    """A random-weight SD3 transformer of a named config, frozen and (optionally) quantized as the trainer's
    `load_transformer` leaves a loaded one. Built on the meta device and filled tensor by tensor on `device`
    (std 0.02), each block linear quantized as it is made: a quantized row never holds the full-precision
    model (15 GiB for SD3.5 Large in bf16), so what fits a card in training fits it here."""
    from diffusers import SD3Transformer2DModel

    from train.model import fill

    device = torch.device(device)
    with torch.device("meta"):
        t = SD3Transformer2DModel(**model_config(name))
    t.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    return fill(t, quantize, dtype, device,
                lambda _, shape: (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype))


class BenchRun:
    """The trainer's own parts without a shard set: the run's Accelerator, `prepare_trainable`, `Objective` and
    `TrainStep`, on a given transformer, fed one random batch of the real shapes again and again."""

    def __init__(self, transformer, cfg, resolution: int, text_tokens: int, device):
        from train.objective import Objective, prepare_trainable, resolve_dtypes
        from train.step import TrainStep, make_accelerator

        self.device = device
        weight_dtype, amp = resolve_dtypes(cfg, device)
        self.accel = make_accelerator(str(device), amp, cfg.train.grad_accum)
        torch.manual_seed(cfg.train.seed)  # peft's LoRA A init draws from the global generator
        params = prepare_trainable(transformer, cfg)  # LoRA, or (train.mode=full) the weights themselves
        c = transformer.config
        extras = {"empty_prompt_embeds": torch.zeros(text_tokens, c.joint_attention_dim),
                  "empty_pooled_prompt_embeds": torch.zeros(c.pooled_projection_dim)}
        objective = Objective(cfg, BENCH_MANIFEST, extras, SD3_SCHEDULER, device, weight_dtype)
        self.stepper = TrainStep(self.accel, transformer, params, objective, cfg.train)
        self.batch = random_batch(c, resolution, cfg.train.batch_size, text_tokens, cfg.train.seed,
                                  pin=device.type == "cuda")

    def step(self) -> dict:
        return self.stepper.step(lambda: self.batch)

    def time_steps(self, warmup: int, steps: int):
        """Seconds of each timed step (after `warmup` untimed ones) and how many were not applied."""
        applied = []
        times = timed_calls(lambda: applied.append(self.step()["applied"]), self.device, warmup, steps)
        nonfinite = sum(not a for a in applied[warmup:])
        return times, nonfinite


def _measure_train(model, resolution, cfg, device, steps, warmup, text_tokens):
    """Build, train `warmup + steps` steps, return (step seconds, non-finite steps, peak memory, dtype)."""
    from train.objective import resolve_dtypes

    weight_dtype, _ = resolve_dtypes(cfg, device)
    transformer = build_transformer(model, weight_dtype, device, cfg.model.quantize)
    release(device, collect=False)  # the build's transients (bf16 weights before nf4) are not training's
    mem = PeakMemory(device)
    run = BenchRun(transformer, cfg, resolution, text_tokens, device)
    times, nonfinite = run.time_steps(warmup, steps)
    return times, nonfinite, mem.read(), weight_dtype


def train_row(model: str, resolution: int, batch: int, quantize: str = "none", checkpointing: bool = False,
              device=None, steps: int = 5, warmup: int = 2, peak_flops: Optional[float] = None,
              text_tokens: int = TEXT_TOKENS, rank: int = LORA_RANK) -> Row:
    """One LoRA training-step row: peak memory, median step time, samples/s, FLOPs and MFU ("OOM" if it does
    not fit). Peak memory counts from the built model on (weights, LoRA, optimizer state, activations), not
    the build's transients. `peak_flops` is measured with `matmul_peak_flops` when not given."""
    device = torch.device(device or default_device())
    config = check_train_settings(model, resolution, batch, quantize, steps, warmup)
    cuda = device.type == "cuda"
    settings = {"model": model, "resolution": resolution, "batch": batch,
                "base_dtype": quantize if quantize != "none" else ("bf16" if cuda else "fp32"),
                "checkpointing": checkpointing, "lora_rank": rank, "lora_targets": "attn", "optimizer": "adamw",
                "text_tokens": text_tokens, "steps": steps, "warmup": warmup, "device": device_name(device)}
    what = f"LoRA step (trainer's TrainStep, flow loss, AdamW) on random {model} weights"
    return _measured_row(what, settings, config, bench_config(quantize, checkpointing, batch, rank), device, steps,
                         warmup, text_tokens, peak_flops)


def full_row(model: str, resolution: int, batch: int, fused: bool, optimizer: str = "adamw8bit",
             checkpointing: bool = True, device=None, steps: int = 5, warmup: int = 2,
             peak_flops: Optional[float] = None, text_tokens: int = TEXT_TOKENS) -> Row:
    """One full fine-tuning step row (train.mode=full, every weight trained; on a GPU bf16 weights updated by
    stochastic rounding, optionally with the fused backward step): what `train_row` measures, for full mode."""
    device = torch.device(device or default_device())
    config = check_train_settings(model, resolution, batch, "none", steps, warmup)
    cuda = device.type == "cuda"
    settings = {"model": model, "resolution": resolution, "batch": batch, "base_dtype": "bf16" if cuda else "fp32",
                "checkpointing": checkpointing, "mode": "full", "optimizer": optimizer, "fused_step": fused,
                "text_tokens": text_tokens, "steps": steps, "warmup": warmup, "device": device_name(device)}
    what = f"full fine-tuning step (trainer's TrainStep, {optimizer}{', fused' if fused else ''}) on random {model} weights"
    cfg = bench_config("none", checkpointing, batch)
    cfg.train.mode, cfg.train.optimizer, cfg.train.fused_step = "full", optimizer, fused
    return _measured_row(what, settings, config, cfg, device, steps, warmup, text_tokens, peak_flops)


def _measured_row(what: str, settings: dict, config: dict, cfg, device, steps: int, warmup: int, text_tokens: int,
                  peak_flops: Optional[float]) -> Row:
    model, resolution, batch = settings["model"], settings["resolution"], settings["batch"]
    peak_flops = peak_flops or matmul_peak_flops(device)
    measured = unless_oom(lambda: _measure_train(model, resolution, cfg, device, steps, warmup, text_tokens), device)
    if measured is None:
        return Row("train", what, settings, status="OOM")
    times, nonfinite, mem, weight_dtype = measured
    t = statistics.median(times)
    step_flops = train_step_flops(config, resolution, resolution, text_tokens, batch, full=cfg.train.mode == "full")
    return Row.of("train", what, settings, status="ok", seconds=t, step_seconds=times, samples_per_s=batch / t,
                  **mem, forward_flops=forward_flops(config, resolution, resolution, text_tokens),
                  step_flops=step_flops, peak_flops=peak_flops, mfu=step_flops / (t * peak_flops),
                  compute_dtype=str(weight_dtype).replace("torch.", ""), nonfinite_steps=nonfinite)


def train_rows(matrix: List[dict], device, peak_flops: float, steps: int, warmup: int) -> Iterator[Row]:
    for s in matrix:
        yield train_row(device=device, peak_flops=peak_flops, steps=steps, warmup=warmup, **s)


def full_rows(quick: bool, models: List[str], resolutions: List[int], batches: List[int], steps: int,
              warmup: int) -> Iterator[Row]:
    sizes = [("tiny", 128, 1)] if quick else [(m, r, b) for m in models for r in resolutions for b in batches]
    for m, r, b in sizes:
        check_train_settings(m, r, b, "none", steps, warmup)
    device = default_device()
    optimizer = "adamw8bit" if device.type == "cuda" else "adamw"  # bitsandbytes' 8-bit state needs CUDA
    peak_flops = matmul_peak_flops(device)
    for m, r, b in sizes:
        for fused in (True, False):
            yield full_row(m, r, b, fused, optimizer, device=device, steps=steps, warmup=warmup, peak_flops=peak_flops)


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model's fixed matrix (runs on a CPU)")
    add_matrix_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    ap.add_argument("--full", action="store_true",
                    help="full fine-tuning rows instead (train.mode=full, checkpointing, with and without the fused "
                         "step; 8-bit AdamW on a GPU, AdamW on a CPU)")
    add_json_arg(ap)
    a = ap.parse_args(argv)
    settle_matrix_args(a)
    steps = a.steps if a.steps is not None else (3 if a.quick else 5)
    if a.full:
        reported(full_rows(a.quick, models_named(a.models), a.resolutions, a.batches, steps, a.warmup), a.json,
                 lambda r: "  ".join(table_cells(r)))
        return
    matrix = QUICK_MATRIX if a.quick else train_matrix(models_named(a.models), a.resolutions, a.batches, a.bases)
    for s in matrix:  # every row's settings before the first row runs
        check_train_settings(s["model"], s["resolution"], s["batch"], s["quantize"], steps, a.warmup)
    device = default_device()
    peak_flops = matmul_peak_flops(device)
    reported(train_rows(matrix, device, peak_flops, steps, a.warmup), a.json, lambda r: "  ".join(table_cells(r)))


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.train_step", main)
