"""The settings of the train and modelled rows, from the command line's `--models`, `--resolutions`, `--batches`
and `--bases`: here, not in a stage's module, so that `python -m bench` checks every row's settings before
the first row runs without importing the trainer, and the stage modules build the same rows from the same
arguments."""
import argparse
from typing import List

from shards.common.errors import UsageError

from .flops import forward_flops
from .measure import TRANSFORMER_CONFIGS

MODELS = TRANSFORMER_CONFIGS
GPU_MODELS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
BASES = ("none", "nf4", "int8")
# The harness check: tiny rows with 77 + 77 text tokens (T5 at the precompute default of 77).
QUICK_MATRIX = [dict(model="tiny", quantize=q, resolution=128, batch=2, checkpointing=c, text_tokens=77 + 77)
                for q in ("none", "nf4") for c in (False, True)]
QUICK_MODELLED = [dict(model="tiny", resolution=128, batch=2, checkpointing=c, text_tokens=77 + 77)
                  for c in (False, True)] + \
                 [dict(model="tiny", resolution=128, batch=2, checkpointing=True, quantize="nf4", text_tokens=154)]


def model_config(name: str) -> dict:
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    return dict(MODELS[name])


def check_train_settings(model: str, resolution: int, batch: int, quantize: str = "none", steps: int = 1,
                         warmup: int = 0) -> dict:
    """The model's config once a train row's settings are known to be runnable; else a one-line UsageError."""
    config = model_config(model)
    if quantize not in BASES:
        raise UsageError(f"quantize '{quantize}' is not one of {', '.join(BASES)}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise UsageError("batch and steps must be at least 1, warmup at least 0")
    forward_flops(config, resolution, resolution)  # checks the size
    limit = config["pos_embed_max_size"] * config["patch_size"] * 8
    if resolution > limit:
        raise UsageError(f"resolution {resolution} is larger than {model}'s position grid allows ({limit} px a side)")
    return config


def train_matrix(models=GPU_MODELS, resolutions=(512, 1024), batches=(1, 4), bases=("none", "nf4")) -> List[dict]:
    """The GPU train rows: each model × resolution × batch × base (bf16, nf4) × checkpointing off/on."""
    return [dict(model=m, quantize=q, resolution=r, batch=b, checkpointing=c)
            for m in models for q in bases for r in resolutions for b in batches for c in (False, True)]


def modelled_matrix(models=GPU_MODELS, resolutions=(512, 1024), batches=(1, 4), bases=("none", "nf4")) -> List[dict]:
    """bf16 base: every model × resolution × batch × checkpointing; a quantized base: checkpointing, batch 1."""
    rows = [dict(model=m, resolution=r, batch=b, checkpointing=c)
            for m in models for r in resolutions for b in batches for c in (False, True)] if "none" in bases else []
    rows += [dict(model=m, resolution=r, batch=1, checkpointing=True, quantize=q)
             for q in bases if q != "none" for m in models for r in resolutions]
    return rows


def add_matrix_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that choose the GPU rows; None where not given (`--quick` may not be given with them)."""
    ap.add_argument("--models", default=None,
                    help=f"GPU train rows: comma list of {', '.join(GPU_MODELS)} (default: all)")
    ap.add_argument("--resolutions", default=None, help="GPU train rows: comma list of square sizes (default: 512,1024)")
    ap.add_argument("--batches", default=None, help="GPU train rows: comma list of batch sizes (default: 1,4)")
    ap.add_argument("--bases", default=None, help="train and modelled rows: comma list of base dtypes: none (the "
                                                  "bf16 base), nf4, int8 (default: none,nf4)")


def settle_matrix_args(a: argparse.Namespace) -> None:
    """Refuse the matrix arguments beside --quick, fill in their defaults, and parse them in place: models a list
    of known names, resolutions and batches lists of positive numbers, bases a list of BASES."""
    chosen = [f"--{k}" for k in ("models", "resolutions", "batches", "bases") if getattr(a, k) is not None]
    if a.quick and chosen:
        raise UsageError(f"{', '.join(chosen)} choose GPU train rows; --quick runs a fixed tiny matrix instead: "
                         "leave out one or the other")
    a.bases = [b.strip() for b in (a.bases if a.bases is not None else "none,nf4").split(",") if b.strip()]
    if not a.bases or set(a.bases) - set(BASES):
        raise UsageError("--bases: a comma list of none, nf4 and int8")
    a.models = [m.strip() for m in (a.models if a.models is not None else ",".join(GPU_MODELS)).split(",") if m.strip()]
    a.resolutions = int_list("resolutions", a.resolutions if a.resolutions is not None else "512,1024")
    a.batches = int_list("batches", a.batches if a.batches is not None else "1,4")


def models_named(models: List[str]) -> List[str]:
    if not models:
        raise UsageError("--models: no model named")
    for m in models:
        model_config(m)
    return models


def int_list(key: str, text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{key}: '{text}' is not a comma list of whole numbers") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{key}: '{text}' needs positive numbers")
    return values


def matrix_args(a: argparse.Namespace) -> List[str]:
    """The settled matrix arguments as a stage module's command line takes them."""
    if a.quick:
        return ["--quick"]
    return ["--models", ",".join(a.models), "--resolutions", ",".join(map(str, a.resolutions)),
            "--batches", ",".join(map(str, a.batches)), "--bases", ",".join(a.bases)]
