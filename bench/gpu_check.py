"""The first GPU session in one command: `make gpu-check` (`python -m bench.gpu_check [--dry-run] [--out DIR]`).

On one CUDA GPU, each part in its own process, within a time budget (default 8 minutes):
  1. the tiny pipeline end to end on the GPU, bf16 and nf4 bases: precompute -> train 10 steps -> the same
     command to 20 steps (a resume from the step-10 checkpoint) -> merge -> the release loaded by diffusers
     and sampled on the GPU;
  2. measured LoRA-step rows: SD3 Medium 1024², batch 1 and 4, bf16 and nf4 bases, checkpointing off and on;
     and SD3 Medium full fine-tuning steps (8-bit AdamW, checkpointing, with and without the fused step);
  3. SD3.5 Large with an nf4 base, 1024², batch 1;
  4. precompute's encoders at real component sizes, every encoder resident and idle ones on the host;
  5. with `train.deterministic=true`, a tiny run resumed at step 10 ends with the same bytes as one run through.
It writes OUT/gpu-check-<device>-<date>.json (every part's exit status, seconds and output tail, and the
rows) and prints one table, each measured row beside the modelled row of the same settings from the
repository's bench/ results (modelled rows need no GPU: `make bench ARGS="--rows modelled"` makes them).
Without CUDA it refuses in one line; `--dry-run` prints the plan and does nothing, on any machine. Like
`python -m bench`, it imports no stage: each part is a command.
"""
import argparse
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import List

from shards.common.errors import UsageError

from .results import format_table, load_results
from .row import Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 8 * 60


def plan(out: str) -> List[dict]:
    """Each part: a name, the command (run from the repository root) and the seconds it may take."""
    py = sys.executable
    tiny = os.path.join(out, "tiny")
    model, data, shards = (os.path.join(tiny, x) for x in ("model", "data", "shards"))
    bench = os.path.join(out, "bench")
    steps = [
        dict(name="tiny model and data", timeout=60,
             cmd=f"{py} -m precompute.tiny model {model} && {py} -m precompute.tiny data {data}"),
        dict(name="tiny precompute on the GPU", timeout=90,
             cmd=f"{py} -m precompute --config configs/tiny/precompute.yaml model.path={model} data.path={data} "
                 f"out.dir={shards} out.overwrite=true"),
    ]
    for base in ("none", "nf4"):
        run = os.path.join(tiny, f"train-{base}")
        train = (f"{py} -m train --config configs/tiny/train.yaml model.path={model} data.shards={shards} "
                 f"out.dir={run} model.quantize={base} checkpoint.every=10 validation.every=10 validation.steps=4")
        steps += [
            dict(name=f"tiny train 10 steps, {base} base", timeout=90, cmd=f"{train} train.max_steps=10"),
            dict(name=f"tiny train resumed to 20 steps, {base} base", timeout=90, cmd=f"{train} train.max_steps=20"),
        ]
    release = os.path.join(tiny, "release")
    steps += [
        dict(name="tiny merge", timeout=60,
             cmd=f"{py} -m merge --config configs/tiny/merge.yaml model.path={model} "
                 f"lora.path={os.path.join(tiny, 'train-none', 'pytorch_lora_weights.safetensors')} out.dir={release}"),
        dict(name="tiny release sampled by diffusers on the GPU", timeout=60,
             cmd=f"{py} -m bench.gpu_check --sample {release}"),
        dict(name="SD3 Medium 1024² LoRA steps", timeout=150,
             cmd=f"{py} -m bench --rows train --models sd3-medium --resolutions 1024 --batches 1,4 "
                 f"--steps 3 --warmup 1 --out {bench}"),
        dict(name="SD3 Medium 1024² full fine-tuning steps, 8-bit AdamW, fused and not", timeout=150,
             cmd=f"{py} -m bench.train_step --full --models sd3-medium --resolutions 1024 --batches 1 "
                 f"--steps 3 --warmup 1 --json {os.path.join(bench, 'results-full.json')}"),
        dict(name="SD3.5 Large nf4 1024² batch 1 LoRA steps", timeout=120,
             cmd=f"{py} -m bench --rows train --models sd3.5-large --resolutions 1024 --batches 1 "
                 f"--bases nf4 --steps 3 --warmup 1 --out {bench}"),
        dict(name="precompute at real component sizes", timeout=120,
             cmd=f"{py} -m bench --rows precompute --steps 2 --out {bench}"),
        dict(name="precompute at real component sizes, idle encoders on the host", timeout=120,
             cmd=f"{py} -m bench.precompute --offload idle --batches 4 --steps 2 "
                 f"--json {os.path.join(bench, 'results-precompute-idle.json')}"),
    ]
    # train.deterministic: a run resumed at step 10 ends with the same bytes as one that ran through.
    det = (f"{py} -m train --config configs/tiny/train.yaml model.path={model} data.shards={shards} "
           f"checkpoint.every=10 validation.enabled=false train.deterministic=true")
    through, resumed = os.path.join(tiny, "det-through"), os.path.join(tiny, "det-resumed")
    steps += [
        dict(name="deterministic run, resumed at step 10, equals one run through", timeout=120,
             cmd=f"{det} out.dir={through} train.max_steps=20 && {det} out.dir={resumed} train.max_steps=10 && "
                 f"{det} out.dir={resumed} train.max_steps=20 && {py} -m bench.gpu_check --same "
                 f"{through}/pytorch_lora_weights.safetensors {resumed}/pytorch_lora_weights.safetensors"),
    ]
    return steps


def same_tensors(a: str, b: str) -> None:
    """Fail unless two safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    differ = [k for k in x if k not in y or not x[k].equal(y[k])]
    if differ or x.keys() != y.keys():
        raise SystemExit(f"gpu_check: {a} and {b} differ in {len(differ)} tensors, e.g. {differ[:2]}")
    print(f"identical: {len(x)} tensors")


def sample_release(path: str) -> None:
    """Load a merged release with diffusers on the GPU and sample one image; fail on a non-finite result."""
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    image = pipe("a photo of a cat", num_inference_steps=4, height=128, width=128, output_type="np",
                 generator=torch.Generator("cuda").manual_seed(0)).images[0]
    if not np.isfinite(image).all():
        raise SystemExit(f"gpu_check: the release at {path} samples non-finite pixels on the GPU")
    print(f"sampled {image.shape} from {path} on {torch.cuda.get_device_name()}")


def run(out: str, budget_s: float) -> dict:
    import torch

    from .measure import device_name

    device = torch.device("cuda")
    started, parts = time.perf_counter(), []
    for step in plan(out):
        left = budget_s - (time.perf_counter() - started)
        if left < 10:
            parts.append({**step, "status": "not run: out of time"})
            print(f"gpu_check: {step['name']}: not run, out of time", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        status, tail = run_part(step["cmd"], min(step["timeout"], left))
        parts.append({**step, "status": status, "seconds": time.perf_counter() - t0, "output_tail": tail})
        print(f"gpu_check: {step['name']}: {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = _rows(os.path.join(out, "bench"))
    rows += modelled_beside(rows, _rows(os.path.join(REPO, "bench")))
    result = {"device": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
              "seconds": time.perf_counter() - started, "parts": parts, "rows": [r.to_json() for r in rows]}
    path = os.path.join(out, f"gpu-check-{device_name(device)}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    result.update(path=path, rows=rows)
    return result


def run_part(cmd: str, timeout: float):
    """(status, output tail) of one part. Its own process group, all of it killed at the timeout: `python -m
    bench` runs each stage's benchmark as a child process, which must not go on using the GPU beside the next
    part."""
    p = subprocess.Popen(cmd, shell=True, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return ("ok" if p.returncode == 0 else f"failed (exit {p.returncode})"), (out + err)[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return "timed out", (out + err)[-3000:]


def _rows(folder: str) -> List[Row]:
    return [r for path in sorted(glob.glob(os.path.join(folder, "results-*.json"))) for r in load_results(path)[1]]


SAME = ("model", "resolution", "batch", "base_dtype", "checkpointing", "mode", "fused_step")


def modelled_beside(measured: List[Row], known: List[Row]) -> List[Row]:
    """The newest modelled row for each measured train row's settings (model, size, batch, base, checkpointing,
    and for full fine-tuning the mode and fused step)."""
    modelled = {tuple(r.settings.get(k) for k in SAME): r for r in known if r.row == "modelled"}
    out = []
    for r in measured:
        match = modelled.get(tuple(r.settings.get(k) for k in SAME)) if r.row == "train" else None
        if match is not None and match not in out:
            out.append(match)
    return out


def table(result: dict) -> str:
    lines = [f"{p['status']:<28} {p.get('seconds', 0):6.0f} s  {p['name']}" for p in result["parts"]]
    return "\n".join(lines + ["", format_table(result["rows"]) if result["rows"] else "(no rows)"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and do nothing (any machine)")
    ap.add_argument("--out", default=os.path.join("build", "gpu-check"), help="folder of everything it writes")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together (default 480)")
    ap.add_argument("--sample", metavar="RELEASE", help=argparse.SUPPRESS)  # one part: sample a release on the GPU
    ap.add_argument("--same", nargs=2, metavar="FILE", help=argparse.SUPPRESS)  # one part: compare two LoRA files
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.same:
        same_tensors(*a.same)
        return
    if a.sample:
        sample_release(a.sample)
        return
    out = os.path.abspath(a.out)
    if a.dry_run:
        total = 0
        for i, step in enumerate(plan(out), 1):
            total += step["timeout"]
            print(f"{i:2}. {step['name']} (at most {step['timeout']} s)\n    {step['cmd']}")
        print(f"at most {min(total, a.budget):.0f} s in all (budget {a.budget:.0f} s); writes {out}/gpu-check-<device>-<date>.json")
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError("gpu_check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
                         "`--dry-run` shows the plan anywhere")
    os.makedirs(out, exist_ok=True)
    result = run(out, a.budget)
    print(table(result))
    print(f"\nwrote {result['path']}")


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.gpu_check", main)
