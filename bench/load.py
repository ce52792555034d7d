"""Host memory of loading a quantized base: `python -m bench.load [--models sd3-medium,sd3.5-large]`.

Writes a random-weight transformer folder of each published config (bf16, one safetensors file, written
tensor by tensor), then loads it with `model.quantize=nf4` onto the CPU in a fresh process per loader and
reports that process's peak RSS and seconds:
  streamed  `train.model.load_transformer`: each block linear read and quantized as it arrives
  whole     the whole transformer loaded in bf16 (`from_pretrained`), then its block linears quantized
On a GPU the quantized weights would live on the device; on the CPU they stay in the process, so the peak
is the quantized model plus what loading holds beside it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from .measure import TRANSFORMER_CONFIGS, peak_rss_mb

LOADERS = ("streamed", "whole")


def write_random_transformer(model: str, folder: str) -> str:
    """`folder` as a diffusers transformer folder of `model`'s config with random bf16 weights (std 0.02)."""
    from diffusers import SD3Transformer2DModel

    from shards.tensorfile import write_tensor_file

    config = dict(TRANSFORMER_CONFIGS[model])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SD3Transformer2DModel(**config).state_dict().items()}

    def maker(shape, seed):
        return lambda: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)

    os.makedirs(folder, exist_ok=True)
    planned = [(k, torch.bfloat16, s, maker(s, i)) for i, (k, s) in enumerate(sorted(shapes.items()))]
    write_tensor_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"), planned, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "SD3Transformer2DModel", **config,
                   "dual_attention_layers": list(config["dual_attention_layers"])}, f)
    return folder


def load(folder: str, loader: str, quantize: str) -> dict:
    """Load in this process; its peak RSS (from process start) and the seconds loading took."""
    from diffusers import SD3Transformer2DModel

    from train.model import freeze_and_place, load_transformer

    cpu, t0 = torch.device("cpu"), time.perf_counter()
    root = os.path.dirname(folder)
    if loader == "streamed":
        t = load_transformer(root, torch.bfloat16, cpu, quantize)
    else:
        t = freeze_and_place(SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16), torch.bfloat16,
                             cpu, quantize)
    held = sum(x.numel() * x.element_size() for x in t.state_dict().values())
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "model_mb": held / 2 ** 20}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd3-medium,sd3.5-large")
    ap.add_argument("--quantize", default="nf4", choices=("nf4", "int8"))
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--dir", default=None, help="where the random folders go (default: a temporary folder)")
    ap.add_argument("--load", nargs=2, metavar=("FOLDER", "LOADER"), help=argparse.SUPPRESS)  # one measurement
    a = ap.parse_args(argv)
    if a.load:
        print(json.dumps(load(a.load[0], a.load[1], a.quantize)))
        return
    base = a.dir or tempfile.mkdtemp(prefix="shardtune-load-bench-")
    for model in a.models.split(","):
        folder = os.path.join(base, model, "transformer")
        if not os.path.exists(os.path.join(folder, "config.json")):
            write_random_transformer(model, folder)
        for loader in a.loaders.split(","):
            p = subprocess.run([sys.executable, "-m", "bench.load", "--quantize", a.quantize, "--load", folder,
                                loader], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"bench.load: {model} {loader} failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(json.dumps({"model": model, "quantize": a.quantize, "loader": loader, **r}), flush=True)


if __name__ == "__main__":
    main()
