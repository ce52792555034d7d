"""The benchmarks of `make bench`: `python -m bench [--quick] [--rows train,precompute,stream,merge] [--out bench/]`.

Runs the rows that fit this machine (the train and precompute rows on real model sizes need a CUDA GPU;
`--quick` runs tiny-model versions of them anywhere), prints one table and writes
`OUT/results-<device>-<YYYY-MM-DD>.json` (rows of an earlier run that day with other settings are kept).

Each kind of row comes from its stage's benchmark module, run as its own process with `--json FILE`:
bench.train_step (train), bench.precompute (precompute), bench.stream (stream), bench.merge (merge), and
bench.memory and bench.precompute_memory (modelled: GPU memory on a fake GPU, never a measurement). This
module imports none of the stages: a stage's module imports that stage alone (README, "Layout"), and a
row's peak RSS is its own process's. Every row is a `bench.row.Row`.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List

import torch

from shards.common.errors import DataError, UsageError

from .flops import MFU_DEFINITION
from .matrix import (QUICK_MATRIX, add_matrix_args, check_train_settings, matrix_args, models_named,
                     settle_matrix_args, train_matrix)
from .measure import default_device
from .results import format_table, load_results, results_path, save_results, table_cells
from .row import KINDS, Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_S = 0.2  # how often a running stage's rows file is read for new rows


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                 epilog="On a machine without CUDA only --quick runs the train and precompute rows.")
    ap.add_argument("--quick", action="store_true", help="tiny-model versions of the GPU rows, few steps")
    # The modelled rows are the same on every machine (and take ~20 min for the whole matrix): asked for by name.
    ap.add_argument("--rows", default=",".join(k for k in KINDS if k != "modelled"),
                    help=f"comma list of {', '.join(KINDS)} (default: all but modelled)")
    ap.add_argument("--out", default=None, help="folder of the results JSON (default: bench; with --quick: build/bench, "
                                                "so harness checks never mix with measurements)")
    add_matrix_args(ap)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per train row (default 5; 3 with --quick) and batches per precompute row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed train steps before them (default 2)")
    ap.add_argument("--tiny-model", default=None,
                    help="--quick precompute row: an existing tiny pipeline folder (default: build one)")
    a = ap.parse_args(argv)
    settle_matrix_args(a)
    a.out = a.out if a.out is not None else os.path.join("build", "bench") if a.quick else "bench"
    return a


def _selected_kinds(text: str) -> List[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        what = f"{', '.join(bad)} not known" if bad else "no row named"
        raise UsageError(f"--rows: {what}; choose from {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def _rows_so_far(path: str) -> List[Row]:
    if not os.path.exists(path):
        return []
    return load_results(path)[1]  # written atomically by the stage: always whole


def stage_rows(module: str, *args: str) -> Iterator[Row]:
    """Rows of a stage's benchmark module, `python -m MODULE --json FILE ARGS`, run as its own process, each row
    as soon as the module has written it. Its progress and errors go to this terminal; a failure is one line
    naming the command, after the rows it made before failing."""
    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", module, "--json", path, *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        seen = 0
        try:
            while True:
                finished = p.poll() is not None  # before the read, so that the last rows are not missed
                rows = _rows_so_far(path)
                yield from rows[seen:]
                seen = max(seen, len(rows))
                if finished:
                    break
                time.sleep(POLL_S)
        finally:
            if p.poll() is None:  # the caller stopped early (an error, Ctrl-C): the stage goes with it
                p.kill()
                p.wait()
        if p.returncode != 0 or not os.path.exists(path):
            raise DataError(f"`python -m {module} {' '.join(args)}` failed (exit {p.returncode}; its message is above)")


def _matrix(a: argparse.Namespace) -> List[dict]:
    if a.quick:
        return QUICK_MATRIX
    return train_matrix(models_named(a.models), a.resolutions, a.batches, a.bases)


def _providers(kinds: List[str], a: argparse.Namespace, device: torch.device) -> Dict[str, Callable]:
    """For each wanted kind, a function returning its rows; [] (with a note) where this machine cannot run it."""
    gpu_ok = device.type == "cuda" or a.quick
    steps = a.steps if a.steps is not None else (3 if a.quick else 5)
    if a.warmup < 0 or steps < 1:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    if "train" in kinds:
        for s in _matrix(a):  # every row's settings before the first row runs
            check_train_settings(s["model"], s["resolution"], s["batch"], s["quantize"], steps, a.warmup)
    if "modelled" in kinds and not a.quick:
        models_named(a.models)

    def train():
        return stage_rows("bench.train_step", *matrix_args(a), "--steps", str(steps), "--warmup", str(a.warmup))

    def precompute():
        args = ["--quick"] * a.quick + ["--tiny-model", a.tiny_model] * bool(a.tiny_model) + \
            ["--steps", str(a.steps)] * (a.steps is not None)
        return stage_rows("bench.precompute", *args)

    def modelled():
        yield from stage_rows("bench.memory", *matrix_args(a))
        if not a.quick:  # precompute's encoders, with every encoder resident and with idle ones on the host
            yield from stage_rows("bench.precompute_memory", "--resolution", str(max(a.resolutions)))

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
            out[kind] = modelled
        else:
            out[kind] = lambda module=f"bench.{kind}": stage_rows(module, *["--quick"] * a.quick)
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _progress(r: Row) -> None:
    print("bench: " + "  ".join(c for c in table_cells(r) if c != "-"), file=sys.stderr, flush=True)


def main(argv=None) -> str:
    """Run the selected rows, print the table, write the results file; returns its path."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    kinds = _selected_kinds(a.rows)
    device = default_device()
    providers = _providers(kinds, a, device)  # checks every setting before any work
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {a.out} ({e.strerror})") from None
    path = results_path(a.out, device)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "command": "python -m bench " + " ".join(argv),
              "versions": _versions(), "mfu": MFU_DEFINITION, "matmul_peak_flops": None}
    rows = []
    for kind in kinds:
        for r in providers[kind]():
            if r.row != kind:
                raise DataError(f"the {kind} benchmark gave a {r.row} row: {r.what}")
            if a.quick:  # tiny stand-ins: marked, so they are never read as measurements of real sizes
                r = r.replace(settings={**r.settings, "quick": True})
            if kind == "train" and header["matmul_peak_flops"] is None:
                header["matmul_peak_flops"] = r.extra.get("peak_flops")  # measured once by the train rows' process
            rows.append(r)
            _progress(r)
            save_results(path, rows, header)
    if not rows:
        raise UsageError("no rows ran on this machine (see the notes above); choose --rows it can run, or --quick")
    print(format_table(rows))
    print(f"\nwrote {path}")
    return path
