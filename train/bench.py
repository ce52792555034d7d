"""The benchmarks of `make bench`: `python -m train.bench [--quick] [--rows train,precompute,stream,merge] [--out bench/]`.

Runs the rows that fit this machine (the train and precompute rows on real model sizes need a CUDA GPU;
`--quick` runs tiny-model versions of them anywhere), prints one table and writes
`OUT/results-<device>-<YYYY-MM-DD>.json` (rows of an earlier run that day with other settings are kept).

The stream rows come from `train.stream_bench`; the precompute and merge rows from `python -m precompute.bench`
and `python -m merge.bench`, each run as its own process (stages do not import each other, and a row's peak
RSS is then its own process's). Every row, whichever stage measures it, is a dict with these keys:

    row       str   "train", "precompute", "stream", "merge" or "modelled" (a model of GPU memory on a fake
                    GPU, never a measurement: train.memory_model)
    what      str   one line: what was timed, on what
    settings  dict  every input that shapes the numbers; the table shows "model", "resolution", "batch",
                    "base_dtype" and "checkpointing" from it when present
    status    str   optional: "ok" (the default), "OOM" (out of device memory: no metrics then) or "modelled"
  metric keys, each optional (left out where it does not apply):
    seconds           float  the timed quantity: median step (train), median batch (precompute), or the
                             whole timed run (stream, merge)
    samples_per_s     float  samples per second (train: training samples; stream: samples read)
    images_per_s      float  images encoded per second (precompute)
    peak_rss_mb       float  peak resident memory of the process during the row, MiB
    peak_mem_mb       float  CUDA: torch.cuda.max_memory_allocated during the row, MiB
    peak_reserved_mb  float  CUDA: torch.cuda.max_memory_reserved during the row, MiB
    modelled_peak_mb  float  modelled rows: the step's peak of live bytes on the fake GPU, MiB
    modelled_total_mb float  modelled rows: that peak plus the stated margins ("margin"), MiB
    mfu               float  model FLOPs utilisation (train rows; see `train_step_flops`)
    baseline          dict   the raw comparison, e.g. {"what": "tarfile read of the same bytes", "seconds": 1.2}
    ratio             float  seconds / baseline["seconds"]: how many times the baseline's time the row takes
    label             str    optional: a short name for the table (else settings["model"])
  Any other key is kept in the JSON file but not shown in the table.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Iterator, List, Optional

import torch

from shards.common.errors import DataError, UsageError
from shards.measure import (TRANSFORMER_CONFIGS, PeakMemory, default_device, device_name, release, timed_calls,
                            unless_oom)

from .bench_results import check_row, format_table, results_path, save_results, table_cells
from .flops import MFU_DEFINITION, TEXT_TOKENS, forward_flops, matmul_peak_flops, train_step_flops
from .synthetic import BENCH_MANIFEST, LORA_RANK, SD3_SCHEDULER, bench_config, random_batch
ROW_KINDS = ("train", "precompute", "stream", "merge", "modelled")

MODELS = TRANSFORMER_CONFIGS
GPU_MODELS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
# ---------------------------------------------------------------- the train-step row

def model_config(name: str) -> dict:
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    return dict(MODELS[name])


def build_transformer(name: str, dtype: torch.dtype, device, quantize: str = "none"):
    """A random-weight SD3 transformer of a named config, frozen and (optionally) quantized as the trainer's
    `load_transformer` leaves a loaded one. Built on the meta device and filled tensor by tensor on `device`
    (std 0.02), each block linear quantized as it is made: a quantized row never holds the full-precision
    model (15 GiB for SD3.5 Large in bf16), so what fits a card in training fits it here."""
    from diffusers import SD3Transformer2DModel

    from .model import fill

    device = torch.device(device)
    with torch.device("meta"):
        t = SD3Transformer2DModel(**model_config(name))
    t.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    return fill(t, quantize, dtype, device,
                lambda _, shape: (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype))


class BenchRun:
    """The trainer's own parts without a shard set: the run's Accelerator, `prepare_lora`, `Objective` and
    `LoraStep`, on a given transformer, fed one random batch of the real shapes again and again."""

    def __init__(self, transformer, cfg, resolution: int, text_tokens: int, device):
        from .objective import Objective, prepare_lora, resolve_dtypes
        from .step import LoraStep, make_accelerator

        self.device = device
        weight_dtype, amp = resolve_dtypes(cfg, device)
        self.accel = make_accelerator(str(device), amp, cfg.train.grad_accum)
        torch.manual_seed(cfg.train.seed)  # peft's LoRA A init draws from the global generator
        params = prepare_lora(transformer, cfg.lora, cfg.model)
        c = transformer.config
        extras = {"empty_prompt_embeds": torch.zeros(text_tokens, c.joint_attention_dim),
                  "empty_pooled_prompt_embeds": torch.zeros(c.pooled_projection_dim)}
        objective = Objective(cfg, BENCH_MANIFEST, extras, SD3_SCHEDULER, device, weight_dtype)
        self.stepper = LoraStep(self.accel, transformer, params, objective, cfg.train)
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


def _measure_train(model, resolution, batch, quantize, checkpointing, device, steps, warmup, text_tokens, rank):
    """Build, train `warmup + steps` steps, return (step seconds, non-finite steps, peak memory, dtype)."""
    from .objective import resolve_dtypes

    cfg = bench_config(quantize, checkpointing, batch, rank)
    weight_dtype, _ = resolve_dtypes(cfg, device)
    transformer = build_transformer(model, weight_dtype, device, quantize)
    release(device, collect=False)  # the build's transients (bf16 weights before nf4) are not training's
    mem = PeakMemory(device)
    run = BenchRun(transformer, cfg, resolution, text_tokens, device)
    times, nonfinite = run.time_steps(warmup, steps)
    return times, nonfinite, mem.read(), weight_dtype


def check_train_settings(model: str, resolution: int, batch: int, quantize: str = "none", steps: int = 1,
                         warmup: int = 0) -> dict:
    """The model's config once a train row's settings are known to be runnable; else a one-line UsageError."""
    config = model_config(model)
    if quantize not in ("none", "nf4", "int8"):
        raise UsageError(f"quantize '{quantize}' is not one of none, nf4, int8")
    if batch < 1 or steps < 1 or warmup < 0:
        raise UsageError("batch and steps must be at least 1, warmup at least 0")
    forward_flops(config, resolution, resolution)  # checks the size
    limit = config["pos_embed_max_size"] * config["patch_size"] * 8
    if resolution > limit:
        raise UsageError(f"resolution {resolution} is larger than {model}'s position grid allows ({limit} px a side)")
    return config


def train_row(model: str, resolution: int, batch: int, quantize: str = "none", checkpointing: bool = False,
              device=None, steps: int = 5, warmup: int = 2, peak_flops: Optional[float] = None,
              text_tokens: int = TEXT_TOKENS, rank: int = LORA_RANK) -> dict:
    """One LoRA training-step row: peak memory, median step time, samples/s, FLOPs and MFU ("OOM" if it does
    not fit). Peak memory counts from the built model on (weights, LoRA, optimizer state, activations), not
    the build's transients. `peak_flops` is measured with `matmul_peak_flops` when not given."""
    device = torch.device(device or default_device())
    config = check_train_settings(model, resolution, batch, quantize, steps, warmup)
    fwd = forward_flops(config, resolution, resolution, text_tokens)
    cuda = device.type == "cuda"
    settings = {"model": model, "resolution": resolution, "batch": batch,
                "base_dtype": quantize if quantize != "none" else ("bf16" if cuda else "fp32"),
                "checkpointing": checkpointing, "lora_rank": rank, "lora_targets": "attn", "optimizer": "adamw",
                "text_tokens": text_tokens, "steps": steps, "warmup": warmup, "device": device_name(device)}
    row = {"row": "train", "settings": settings,
           "what": f"LoRA step (trainer's LoraStep, flow loss, AdamW) on random {model} weights"}
    peak_flops = peak_flops or matmul_peak_flops(device)
    measured = unless_oom(lambda: _measure_train(model, resolution, batch, quantize, checkpointing, device, steps,
                                                 warmup, text_tokens, rank), device)
    if measured is None:
        return {**row, "status": "OOM"}
    times, nonfinite, mem, weight_dtype = measured
    t = statistics.median(times)
    step_flops = train_step_flops(config, resolution, resolution, text_tokens, batch)
    return {**row, "status": "ok", "seconds": t, "step_seconds": times, "samples_per_s": batch / t, **mem,
            "forward_flops": fwd, "step_flops": step_flops, "peak_flops": peak_flops,
            "mfu": step_flops / (t * peak_flops), "compute_dtype": str(weight_dtype).replace("torch.", ""),
            "nonfinite_steps": nonfinite}


def train_matrix(models=GPU_MODELS, resolutions=(512, 1024), batches=(1, 4), bases=("none", "nf4")) -> List[dict]:
    """The GPU train rows: each model × resolution × batch × base (bf16, nf4) × checkpointing off/on."""
    return [dict(model=m, quantize=q, resolution=r, batch=b, checkpointing=c)
            for m in models for q in bases for r in resolutions for b in batches for c in (False, True)]


# The harness check: tiny rows with 77 + 77 text tokens (T5 at the precompute default of 77).
QUICK_MATRIX = [dict(model="tiny", quantize=q, resolution=128, batch=2, checkpointing=c, text_tokens=77 + 77)
                for q in ("none", "nf4") for c in (False, True)]


def train_rows(matrix: List[dict], device, peak_flops: float, steps: int, warmup: int) -> Iterator[dict]:
    for s in matrix:
        yield train_row(device=device, peak_flops=peak_flops, steps=steps, warmup=warmup, **s)


# ---------------------------------------------------------------- orchestrator

def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0],
                                 epilog="On a machine without CUDA only --quick runs the train and precompute rows.")
    ap.add_argument("--quick", action="store_true", help="tiny-model versions of the GPU rows, few steps")
    # The modelled rows are the same on every machine (and take ~20 min for the whole matrix): asked for by name.
    ap.add_argument("--rows", default=",".join(k for k in ROW_KINDS if k != "modelled"),
                    help=f"comma list of {', '.join(ROW_KINDS)} (default: all but modelled)")
    ap.add_argument("--out", default=None, help="folder of the results JSON (default: bench; with --quick: build/bench, "
                                                "so harness checks never mix with measurements)")
    ap.add_argument("--models", default=None,
                    help=f"GPU train rows: comma list of {', '.join(GPU_MODELS)} (default: all)")
    ap.add_argument("--resolutions", default=None, help="GPU train rows: comma list of square sizes (default: 512,1024)")
    ap.add_argument("--batches", default=None, help="GPU train rows: comma list of batch sizes (default: 1,4)")
    ap.add_argument("--bases", default=None, help="train and modelled rows: comma list of base dtypes: none (the "
                                                  "bf16 base), nf4, int8 (default: none,nf4)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per train row (default 5; 3 with --quick) and batches per precompute row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed train steps before them (default 2)")
    ap.add_argument("--tiny-model", default=None,
                    help="--quick precompute row: an existing tiny pipeline folder (default: build one)")
    a = ap.parse_args(argv)
    chosen = [f"--{k}" for k in ("models", "resolutions", "batches", "bases") if getattr(a, k) is not None]
    if a.quick and chosen:
        raise UsageError(f"{', '.join(chosen)} choose GPU train rows; --quick runs a fixed tiny matrix instead: "
                         "leave out one or the other")
    a.models = a.models if a.models is not None else ",".join(GPU_MODELS)
    a.resolutions = a.resolutions if a.resolutions is not None else "512,1024"
    a.batches = a.batches if a.batches is not None else "1,4"
    a.bases = [b.strip() for b in (a.bases if a.bases is not None else "none,nf4").split(",") if b.strip()]
    if not a.bases or set(a.bases) - {"none", "nf4", "int8"}:
        raise UsageError("--bases: a comma list of none, nf4 and int8")
    a.out = a.out if a.out is not None else os.path.join("build", "bench") if a.quick else "bench"
    return a


def _int_list(key: str, text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{key}: '{text}' is not a comma list of whole numbers") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{key}: '{text}' needs positive numbers")
    return values


def _selected_kinds(text: str) -> List[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ROW_KINDS]
    if bad or not kinds:
        what = f"{', '.join(bad)} not known" if bad else "no row named"
        raise UsageError(f"--rows: {what}; choose from {', '.join(ROW_KINDS)}")
    return list(dict.fromkeys(kinds))


def stage_rows(module: str, *args: str) -> List[dict]:
    """Rows of another stage's benchmark, `python -m MODULE --json FILE ARGS`, run as its own process: stages
    do not import each other (README, "Layout"), and a row's peak RSS is then its own process's. Its progress and
    errors go to this terminal; a failure is one line naming the command."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", module, "--json", path, *args]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        p = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
        if p.returncode != 0 or not os.path.exists(path):
            raise DataError(f"`python -m {module} {' '.join(args)}` failed (exit {p.returncode}; its message is above)")
        with open(path) as f:
            return json.load(f)["rows"]


def _matrix(a: argparse.Namespace) -> List[dict]:
    if a.quick:
        return QUICK_MATRIX
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models:
        raise UsageError("--models: no model named")
    return train_matrix(models, _int_list("resolutions", a.resolutions), _int_list("batches", a.batches), a.bases)


def _providers(kinds: List[str], a: argparse.Namespace, device: torch.device, state: dict) -> dict:
    """For each wanted kind, a function returning its rows; [] (with a note) where this machine cannot run it."""
    gpu_ok = device.type == "cuda" or a.quick
    steps = a.steps if a.steps is not None else (3 if a.quick else 5)
    if a.warmup < 0 or steps < 1:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    matrix = _matrix(a) if "train" in kinds else []
    for s in matrix:  # every row's settings before the first row runs
        check_train_settings(s["model"], s["resolution"], s["batch"], s["quantize"], steps, a.warmup)

    def train():
        state["peak_flops"] = matmul_peak_flops(device)
        return train_rows(matrix, device, state["peak_flops"], steps, a.warmup)

    def precompute():
        args = ["--quick"] * a.quick + ["--tiny-model", a.tiny_model] * bool(a.tiny_model) + \
            ["--steps", str(a.steps)] * (a.steps is not None)
        return stage_rows("precompute.bench", *args)

    def skipped(kind):
        def note():
            print(f"bench: {kind} rows need a CUDA GPU at real model sizes; --quick runs tiny-model versions",
                  file=sys.stderr)
            return []
        return note

    out = {}
    for kind in kinds:
        if kind in ("train", "precompute"):
            out[kind] = (train if kind == "train" else precompute) if gpu_ok else skipped(kind)
        elif kind == "modelled":
            out[kind] = lambda: modelled_rows(a)
        elif kind == "stream":
            from .stream_bench import rows as stream_rows

            out[kind] = lambda: stream_rows(a.quick)
        else:
            out[kind] = lambda: stage_rows("merge.bench", *["--quick"] * a.quick)
    return out


def modelled_rows(a: argparse.Namespace) -> Iterator[dict]:
    """Modelled GPU memory (train.memory_model) for --models/--resolutions/--batches; --quick: the tiny model."""
    from .memory_model import modelled_matrix, modelled_row

    if a.quick:
        matrix = [dict(model="tiny", resolution=128, batch=2, checkpointing=c, text_tokens=77 + 77) for c in (False, True)]
        matrix.append(dict(model="tiny", resolution=128, batch=2, checkpointing=True, quantize="nf4", text_tokens=154))
    else:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
        for m in models:
            model_config(m)
        matrix = modelled_matrix(models, _int_list("resolutions", a.resolutions), _int_list("batches", a.batches),
                                 a.bases)
    for s in matrix:
        yield modelled_row(**s)
    if not a.quick:  # what a validation image adds, at the largest size asked for
        from .memory_model import modelled_validation

        for m in dict.fromkeys(s["model"] for s in matrix):
            yield modelled_validation(m, max(_int_list("resolutions", a.resolutions)))
        # precompute's encoders, with every encoder resident and with idle ones on the host
        yield from stage_rows("precompute.memory_model", "--resolution", str(max(_int_list("resolutions", a.resolutions))))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _progress(r: dict) -> None:
    print("bench: " + "  ".join(c for c in table_cells(r) if c != "-"), file=sys.stderr, flush=True)


def main(argv=None) -> str:
    """Run the selected rows, print the table, write the results file; returns its path."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    kinds = _selected_kinds(a.rows)
    device = default_device()
    state = {"peak_flops": None}
    providers = _providers(kinds, a, device, state)  # checks every setting before any work
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {a.out} ({e.strerror})") from None
    path = results_path(a.out, device)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "command": "python -m train.bench " + " ".join(
                  sys.argv[1:] if argv is None else argv), "versions": _versions(), "mfu": MFU_DEFINITION}
    rows = []
    for kind in kinds:
        for r in providers[kind]():
            check_row(r, f"{kind} rows")
            r.setdefault("status", "ok")
            if a.quick:  # tiny stand-ins: marked, so they are never read as measurements of real sizes
                r["settings"] = {**r["settings"], "quick": True}
            rows.append(r)
            _progress(r)
            save_results(path, rows, {**header, "matmul_peak_flops": state["peak_flops"]})
    if not rows:
        raise UsageError("no rows ran on this machine (see the notes above); choose --rows it can run, or --quick")
    print(format_table(rows))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("train.bench", main)
