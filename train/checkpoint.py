"""Checkpoints for exact resume: `out.dir/checkpoints/step-NNNNNN/`, complete once COMPLETE exists.

Holds the trained weights and nothing frozen (`lora.safetensors`; full mode: `transformer.safetensors`, in
files of at most 2 GiB, `transformer-00001-of-00003.safetensors`...), optimizer, LR schedule, EMA, gradient scaler, every RNG state, each process's
data stream position and the resolved config; `resume: auto` continues from the newest complete one.
"""
import json
import os
import random
import re
import shutil
import sys
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from shards.common.atomic import fsync, write_json
from shards.common.errors import DataError, UsageError

from .resume import changes

MARKER = "COMPLETE"
SHARD_BYTES = 2 << 30  # largest weights file of a checkpoint (SD3 Medium's 2B bf16 weights: three files)


def weights_name(cfg) -> str:
    """The checkpoint's weights file stem: the LoRA, or the transformer's trained weights (full mode)."""
    return "transformer" if cfg.train.mode == "full" else "lora"


def _write_weights(folder: str, stem: str, tensors: Dict[str, torch.Tensor]) -> None:
    groups, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    for i, names in enumerate(groups, 1):
        file = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, os.path.join(folder, file))


def _read_weights(folder: str, stem: str) -> Dict[str, torch.Tensor]:
    shard = re.compile(rf"^{stem}-\d{{5}}-of-\d{{5}}\.safetensors$")
    files = [n for n in os.listdir(folder) if n == f"{stem}.safetensors" or shard.match(n)]
    if not files:
        raise UsageError(f"resume: {folder} holds no {stem} weights ({stem}.safetensors); it was written by a run "
                         "of another train.mode")
    out = {}
    for name in sorted(files):
        out.update(load_file(os.path.join(folder, name)))
    return out
_STEP = re.compile(r"^step-(\d{6,})$")


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def complete_checkpoints(out_dir: str):
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        if m and os.path.exists(os.path.join(root, name, MARKER)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def complete_at(out_dir: str, step: int) -> Optional[str]:
    """The complete checkpoint of `step`, if one was written."""
    path = os.path.join(checkpoint_root(out_dir), f"step-{step:06d}")
    return path if os.path.exists(os.path.join(path, MARKER)) else None


def step_of(path: str) -> int:
    """The step a checkpoint folder holds (from the marker it was completed with)."""
    with open(os.path.join(path, MARKER)) as f:
        return int(f.read().strip())


class GlobalRng:
    """The process-wide generators (torch CPU and CUDA, Python's `random`) as a checkpoint part."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])


def save(out_dir: str, step: int, accel, trained: Dict[str, torch.Tensor], shared: Dict, per_rank: Dict,
         state: dict, keep: int, stem: str = "lora") -> str:
    """Write step-NNNNNN.tmp/, then rename it and write the marker; prune to the newest `keep`.

    `shared` and `per_rank` map names to parts with `state_dict()`: the main process writes the shared
    parts (`shared.pt`), the trained weights (files named `stem`) and `state.json`; every process writes its own parts (`rank-R.pt`: its
    data stream position, RNG states)."""
    try:
        return _save(out_dir, step, accel, trained, shared, per_rank, state, keep, stem)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp = os.path.join(checkpoint_root(out_dir), f"step-{step:06d}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        done = complete_checkpoints(out_dir)
        last = f"the last complete one is {done[-1][1]}" if done else "no earlier checkpoint exists"
        raise DataError(f"writing the checkpoint {tmp} failed ({reason}); {last}: free some space and run the "
                        "same command again") from None


def _save(out_dir: str, step: int, accel, trained, shared: Dict, per_rank: Dict, state: dict, keep: int,
          stem: str) -> str:
    root = checkpoint_root(out_dir)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    main = accel.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accel.wait_for_everyone()
    torch.save({name: part.state_dict() for name, part in per_rank.items()},
               os.path.join(tmp, f"rank-{accel.process_index}.pt"))
    accel.wait_for_everyone()
    if main:
        _write_weights(tmp, stem, trained)
        torch.save({name: part.state_dict() for name, part in shared.items()}, os.path.join(tmp, "shared.pt"))
        write_json(os.path.join(tmp, "state.json"), {**state, "processes": accel.num_processes})
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(final, MARKER), "w") as f:
            f.write(f"{step}\n")
        fsync(root)
        for _, old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()
    return final


def find(out_dir: str, resume: str) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(out_dir)
        return done[-1][1] if done else None
    if not os.path.exists(os.path.join(resume, MARKER)):
        raise UsageError(f"resume: {resume} is not a complete checkpoint (no {MARKER} file)")
    return resume


def load(path: str, accel, cfg, trained_target, shared: Dict, per_rank: Dict) -> dict:
    """Restore what `save` wrote into the parts; returns state.json (step, run state, config...).

    With another number of processes than the run that saved it, the parts that can (`repartition`: the
    data stream) take their share of every saved process's state; the others are restored for the ranks
    that existed and start afresh for new ones."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    state["changed"] = changes(state["config"], cfg, path)  # refuses what the saved state cannot follow
    ranks = sorted(int(m.group(1)) for m in (re.match(r"^rank-(\d+)\.pt$", n) for n in os.listdir(path)) if m)
    if not os.path.exists(os.path.join(path, "shared.pt")) or len(ranks) != state.get("processes"):
        raise UsageError(f"resume: {path} was written by an older shardtune (no stream position); "
                         "resume=none starts over")
    if len(ranks) != accel.num_processes and "training" in per_rank:
        raise UsageError(f"resume: {path} was saved by {len(ranks)} processes with train.sharding=fsdp, each holding "
                         f"its shard of the optimizer state; resume it with {len(ranks)} processes "
                         f"(torchrun --nproc-per-node={len(ranks)}), not {accel.num_processes}")
    trained_target.load_trained_state(_read_weights(path, weights_name(cfg)), path)
    saved = torch.load(os.path.join(path, "shared.pt"), map_location="cpu", weights_only=False)
    for name, part in shared.items():
        part.load_state_dict(saved[name])
    if len(ranks) == accel.num_processes:
        mine = torch.load(os.path.join(path, f"rank-{accel.process_index}.pt"), weights_only=False)
        for name, part in per_rank.items():
            part.load_state_dict(mine[name])
        return state
    rank_states = [torch.load(os.path.join(path, f"rank-{r}.pt"), weights_only=False) for r in ranks]
    if accel.is_main_process:
        print(f"train: resuming {path}, saved by {len(ranks)} process(es), with {accel.num_processes}: each "
              "process takes its share of the data the others had left, so batches differ from an uninterrupted "
              "run's", file=sys.stderr)
    for name, part in per_rank.items():
        if hasattr(part, "repartition"):
            part.repartition([s[name] for s in rank_states])
        elif accel.process_index < len(rank_states):
            part.load_state_dict(rank_states[accel.process_index][name])
    return state
