"""Checkpoints for exact resume: `out.dir/checkpoints/step-NNNNNN/`, complete once COMPLETE exists.

Holds the LoRA weights, optimizer, LR schedule, EMA, every RNG state, the data position and the
resolved config; `resume: auto` continues from the newest complete one.
"""
import json
import os
import random
import re
import shutil
import sys
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from shards.atomic import fsync_dir, write_json
from shards.errors import UsageError

MARKER = "COMPLETE"
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


def save(out_dir: str, step: int, run, state: dict, keep: int) -> str:
    """Write step-NNNNNN.tmp/, then rename it and write the marker; prune to the newest `keep`.

    Under DDP every process writes its own RNG state; the main process writes the rest."""
    root = checkpoint_root(out_dir)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    if run.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    run.barrier()
    torch.save({"objective": run.objective.gen.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate()}, os.path.join(tmp, f"rng-rank{run.rank}.pt"))
    run.barrier()
    if run.main:
        lora = {n: p.detach().cpu().float().contiguous() for n, p in run.named_lora_params()}
        save_file(lora, os.path.join(tmp, "lora.safetensors"))
        torch.save({"optimizer": run.opt.state_dict(), "schedule": run.schedule.state_dict(),
                    "ema": run.ema.state_dict() if run.ema else None}, os.path.join(tmp, "optimizer.pt"))
        write_json(os.path.join(tmp, "state.json"), {**state, "processes": run.world})
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(final, MARKER), "w") as f:
            f.write(f"{step}\n")
        fsync_dir(root)
        for _, old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    run.barrier()
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


def load(path: str, run) -> dict:
    """Restore everything `save` wrote into `run`; returns the saved state (step, data position...)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    _check_same_lora(state["config"]["lora"], run.cfg, path)
    _warn_if_stream_changed(state["config"], run.cfg, path)
    lora = load_file(os.path.join(path, "lora.safetensors"))
    params = dict(run.named_lora_params())
    if set(lora) != set(params):
        raise UsageError(f"resume: {path} holds LoRA weights for other modules than this run's lora settings")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(lora[name].shape):
                raise UsageError(f"resume: {name} has shape {tuple(lora[name].shape)} in {path}, {tuple(p.shape)} now")
            p.copy_(lora[name].to(p.dtype))
    opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)  # load_state_dict moves it
    run.opt.load_state_dict(opt["optimizer"])
    run.schedule.load_state_dict(opt["schedule"])
    if run.ema and opt["ema"]:
        run.ema.load_state_dict(opt["ema"])
    elif run.ema:  # EMA switched on at resume: it starts from the weights trained so far
        run.ema.shadow = [p.detach().float().clone() for p in run.ema.params]
    if state.get("processes", 1) != run.world:
        raise UsageError(f"resume: {path} was made by {state.get('processes', 1)} process(es), this run has "
                         f"{run.world}; resume with the same number, or resume=none")
    rng = torch.load(os.path.join(path, f"rng-rank{run.rank}.pt"), weights_only=False)
    run.objective.gen.set_state(rng["objective"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    return state


def _check_same_lora(saved: dict, cfg, path: str) -> None:
    now = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.target_names(),
           "blocks": cfg.lora.blocks}
    before = {"rank": saved["rank"], "alpha": saved["alpha"],
              "targets": list(saved["targets"]) if isinstance(saved["targets"], list) else None,
              "blocks": saved["blocks"]}
    if isinstance(saved["targets"], str):
        from .config import TARGET_PRESETS
        before["targets"] = list(TARGET_PRESETS[saved["targets"]])
    diff = [f"lora.{k} {before[k]} -> {now[k]}" for k in now if before[k] != now[k]]
    if diff:
        raise UsageError(f"resume: {path} was trained with other LoRA settings ({'; '.join(diff)}); "
                         "use the same settings, resume=none, or another out.dir")


def _warn_if_stream_changed(saved: dict, cfg, path: str) -> None:
    """Settings that change the data stream or the draws: allowed, but the resumed run then differs
    from one that was never interrupted."""
    now = {"train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
           "train.seed": cfg.train.seed, "data.shards": cfg.data.shards, "data.shuffle_buffer": cfg.data.shuffle_buffer}
    before = {"train.batch_size": saved["train"]["batch_size"], "train.grad_accum": saved["train"]["grad_accum"],
              "train.seed": saved["train"]["seed"], "data.shards": saved["data"]["shards"],
              "data.shuffle_buffer": saved["data"]["shuffle_buffer"]}
    changed = [f"{k} {before[k]} -> {now[k]}" for k in now if before[k] != now[k]]
    if changed:
        print(f"train: warning: resuming {path} with changed {'; '.join(changed)}: the data order and draws "
              "differ from an uninterrupted run", file=sys.stderr)
