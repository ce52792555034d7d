"""Row "merge" of `make bench`: merging a random-weight, full-size SD3 Medium checkpoint on the CPU.

A random transformer with the real SD3 Medium config (2B parameters, fp16: a 4.2 GB file) is written
tensor by tensor (never whole in memory), as a diffusers pipeline folder and as an original single file,
with a rank-16 LoRA on the trainer's default targets. Each merge runs as its own process, timed from the
outside, with its peak RSS read from /proc (VmHWM), against copying the same checkpoint file. The page cache
is warmed first by reading the inputs once, so merge and copy see the same cache.

`python -m bench.merge [--quick]` prints the rows; `python -m bench --rows merge` puts them in the table.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch

from merge.sd3_keys import plan
from merge.single_file import transformer_jobs, write_single_file
from merge.sources import folder_source
from shards.common.errors import DataError
from shards.tensorfile import write_tensor_file

from .measure import TRANSFORMER_CONFIGS
from .row import Row
from .stage import rows_cli

# The trainer's default targets (train/config.py preset "attn"), as module-name suffixes.
ATTN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
QUICK = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
             num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512, pooled_projection_dim=256,
             pos_embed_max_size=32, qk_norm=None, dual_attention_layers=())
RANK = 16
DTYPE = torch.float16


def transformer_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name and shape of an SD3Transformer2DModel with this config, built on the meta device."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _random(shape, seed: int, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    return lambda: (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_random_pipeline(config: dict, root: str) -> str:
    """A pipeline folder holding only a random transformer (what merge reads; the rest it would link)."""
    tdir = os.path.join(root, "transformer")
    os.makedirs(tdir, exist_ok=True)
    shapes = transformer_shapes(config)
    planned = [(name, DTYPE, shape, _random(shape, i)) for i, (name, shape) in enumerate(sorted(shapes.items()))]
    write_tensor_file(os.path.join(tdir, "diffusion_pytorch_model.safetensors"), planned, {"format": "pt"})
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump({"_class_name": "SD3Transformer2DModel", **config,
                   "dual_attention_layers": list(config.get("dual_attention_layers", ()))}, f)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, f)
    return root


def write_single_file_base(pipeline: str, path: str) -> str:
    """The same transformer in the original single-file layout."""
    with folder_source(os.path.join(pipeline, "transformer"), "bench transformer") as src:
        write_single_file(transformer_jobs(src, {}, "auto"), path, progress=False)
    return path


def write_random_lora(config: dict, path: str, rank: int = RANK) -> int:
    """A diffusers-format LoRA of `rank` on every default target, non-zero A and B; returns its module count."""
    from safetensors.torch import save_file

    shapes = transformer_shapes(config)
    state = {}
    g = torch.Generator().manual_seed(1)
    for name in sorted(shapes):
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.startswith("transformer_blocks.") and module.endswith(ATTN_TARGETS):
            out_f, in_f = shapes[name]
            state[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(DTYPE)
            state[f"transformer.{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(DTYPE)
    meta = {"transformer.r": rank, "transformer.lora_alpha": rank}
    save_file(state, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return len(state) // 2


def _read_all(path: str) -> None:
    """Read a file or folder once so it sits in the page cache (merge and copy then start alike)."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


_CHILD = ("import sys; from merge.run import main; from bench.measure import peak_rss_mb; main(sys.argv[1:]); "
          "print('peak_rss_mb', peak_rss_mb())")


def timed_merge(args: List[str]) -> Tuple[float, float]:
    """(seconds, peak RSS MiB) of `python -m merge ARGS` as its own process (startup and imports included)."""
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        raise DataError(f"bench merge failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return seconds, float(p.stdout.split("peak_rss_mb")[-1])


def timed_copy(src: str, dst: str) -> float:
    """Seconds to copy `src` to `dst` and fsync it (the merge fsyncs each file it writes before publishing it)."""
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def rows(quick: bool = False, repeats: int = 5) -> List[Row]:
    """The merge rows: diffusers folder -> diffusers release, single file -> single file, against copying the
    checkpoint; the best of `repeats` timings of each (one with `quick`), the highest peak RSS."""
    repeats = 1 if quick else repeats
    if quick:
        config, model = QUICK, "small (2 blocks)"
    else:
        config, model = dict(TRANSFORMER_CONFIGS["sd3-medium"]), "sd3-medium"
    out = []
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        pipeline = write_random_pipeline(config, os.path.join(tmp, "base"))
        weights = os.path.join(pipeline, "transformer", "diffusion_pytorch_model.safetensors")
        single = write_single_file_base(pipeline, os.path.join(tmp, "base.safetensors"))
        lora = os.path.join(tmp, "lora.safetensors")
        modules = write_random_lora(config, lora)
        shapes = transformer_shapes(config)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        size_mb = os.path.getsize(weights) / 2**20
        os.sync()  # the inputs just written reach the disk before anything is timed
        _read_all(pipeline)
        _read_all(single)
        kinds = [("diffusers folder -> diffusers release", pipeline), ("single file -> single file", single)]
        copies, merges = [], {kind: [] for kind, _ in kinds}
        for _ in range(repeats):  # alternated, so that each sees the same machine state; the best of each is kept
            copies.append(timed_copy(single, os.path.join(tmp, "copy.safetensors")))
            os.remove(os.path.join(tmp, "copy.safetensors"))
            os.sync()
            for kind, base in kinds:
                dst = os.path.join(tmp, "out-" + kind.split()[0])
                merges[kind].append(timed_merge([f"model.path={base}", f"lora.path={lora}", f"out.dir={dst}"]))
                shutil.rmtree(dst)
                os.sync()  # the next timing does not pay for flushing this one's deletions
        baseline = {"what": f"shutil.copyfile of the {size_mb:.0f} MiB checkpoint + fsync", "seconds": min(copies),
                    "seconds_all": copies}
        for kind, _ in kinds:
            seconds = min(t for t, _ in merges[kind])
            out.append(Row(
                row="merge", what=f"merge, {kind}, one process (imports included)",
                label=f"{model}: {kind.replace(' folder', '').replace(' release', '')}",
                settings={"model": model, "layout": kind.replace(" folder", "").replace(" release", ""),
                          "params": params, "dtype": "fp16", "checkpoint_mb": round(size_mb),
                          "lora_rank": RANK, "lora_modules": modules, "repeats": repeats,
                          "tensors": len(plan(shapes)) if "single" in kind else len(shapes)},
                seconds=seconds, peak_rss_mb=max(rss for _, rss in merges[kind]), baseline=baseline,
                ratio=seconds / baseline["seconds"], extra={"seconds_all": [t for t, _ in merges[kind]]},
            ))
    return out


def _show(r: Row) -> str:
    return (f"{r.what}: {r.seconds:.1f} s, peak RSS {r.peak_rss_mb:.0f} MiB; "
            f"{r.baseline['what']}: {r.baseline['seconds']:.1f} s (x{r.ratio:.2f}); {r.settings}")


def main(argv: List[str]) -> None:
    rows_cli(argv, "python -m bench.merge", "Merge a random full-size SD3 Medium checkpoint on the CPU: seconds and "
             "peak RSS against copying the file.", rows, _show, "a small model instead (seconds, for tests)")


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.merge", main)
