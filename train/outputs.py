"""What a run writes and reports: its state, metrics.jsonl, trackers, loss curves, the LoRA files, the summary."""
import hashlib
import json
import os
import time
from typing import List, Optional

import torch

from shards.common.atomic import atomic_open
from shards.common.config import to_dict
from shards.manifest import Manifest, join, read_bytes

from .lora_file import EMA_WEIGHT_NAME, save_lora
from .plot import change_at_equal_sigma, loss_by_sigma_png, loss_curve_png, metric_series


class RunState:
    """The run's own counters: steps done, per-step losses (for the curve), bad steps in a row, time."""

    def __init__(self):
        self.step, self.history, self.bad_in_a_row = 0, [], 0
        self.samples, self.step_seconds, self.steps_timed = 0, 0.0, 0
        self.config_changes = []  # keys changed at each resume, with the step they took effect after

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "bad_in_a_row": self.bad_in_a_row,
                "samples": self.samples, "step_seconds": self.step_seconds, "steps_timed": self.steps_timed,
                "config_changes": self.config_changes}

    def load_state_dict(self, state: dict) -> None:
        for k, default in self.state_dict().items():
            setattr(self, k, state.get(k, default))


def metric_lines(path: str) -> List[dict]:
    """Parsed metrics lines; a torn last line (full disk, power loss) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def keep_metrics_until(path: str, step: int) -> None:
    """After a resume, drop the lines of steps that will be trained again; the file is replaced atomically,
    so a kill during the rewrite leaves the old history whole."""
    if not os.path.exists(path):
        return
    kept = [r for r in metric_lines(path) if r.get("step", 0) <= step]
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


class Metrics:
    """Per-step values stay on the device; every `log_every` steps (and before a checkpoint, a validation
    and the end) one transfer brings the interval's values to the host and one collective averages the
    loss over processes. Then metrics.jsonl gets one line per step, the trackers and the bar the latest."""

    def __init__(self, cfg, accel, state: RunState, t_start: float):
        self.accel, self.state, self.t_start = accel, state, t_start
        self.main = accel.is_main_process
        self.path = os.path.join(cfg.out.dir, "metrics.jsonl")
        self.file = open(self.path, "a") if self.main else None
        self.pending = []

    def add(self, step: int, out: dict, lr: float) -> None:
        self.pending.append((step, out, lr, round(time.time() - self.t_start, 3)))

    def flush(self, bar=None) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        n = len(pending)
        scalars = torch.stack([torch.stack([o["loss"].float(), o["grad_norm"].float()]) for _, o, _, _ in pending])
        scalars[:, 0] = self.accel.reduce(scalars[:, 0].contiguous(), "mean")
        each = [torch.cat([o["sigmas"].float(), o["losses"].float()]) for _, o, _, _ in pending]
        host = torch.cat([scalars.flatten(), *each]).cpu().tolist()  # the interval's one transfer to the host
        keys = self.accel.gather_for_metrics([[o["keys"] for _, o, _, _ in pending]], use_gather_object=True)
        rate = self.state.samples / max(self.state.step_seconds, 1e-9)
        at = 2 * n
        for i, (step, o, lr, seconds) in enumerate(pending):
            loss, grad_norm = host[2 * i], host[2 * i + 1]
            m = o["sigmas"].numel()
            sigmas, losses = host[at:at + m], host[at + m:at + 2 * m]
            at += 2 * m
            self.state.history.append(loss)
            if self.main:
                self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                            "sigmas": [round(x, 5) for x in sigmas],
                                            "losses": [round(x, 6) for x in losses],
                                            "keys": [per_rank[i] for per_rank in keys], "seconds": seconds}) + "\n")
                self.accel.log({"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_second": rate}, step=step)
        if self.main:
            self.file.flush()
        if bar is not None and n:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{pending[-1][2]:.2e}", samples_s=f"{rate:.1f}", refresh=False)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def init_trackers(cfg, accel) -> None:
    """TensorBoard, Weights & Biases, ... through the run's Accelerator; logs go to out.dir/trackers."""
    if not cfg.train.trackers:
        return
    flat = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items() if isinstance(values, dict) else [("", values)]:
            flat[f"{section}.{k}" if k else section] = v if isinstance(v, (int, float, str, bool)) else str(v)
    accel.init_trackers("trackers", config=flat)


def close_trackers(accel) -> None:
    # Each tracker's own finish: accelerate's end_training would also tear down a DDP process group.
    if accel.is_main_process:
        for tracker in accel.trackers:
            tracker.finish()
    accel.trackers = []


def _data_config(manifest: Manifest) -> dict:
    """The precompute data section the shard set was made with ({} for a set that does not record it)."""
    data = manifest.config.get("data", {})
    return data if isinstance(data, dict) else {}


def manifest_hash(path: str) -> str:
    return hashlib.sha256(read_bytes(join(path, "manifest.json"))).hexdigest()


def finish(cfg, run, metrics_path: str, last_samples: Optional[str], data_read: List[dict], seconds: float) -> dict:
    """Write the LoRA or (full mode) the transformer folder, with its EMA, and the loss curves; the run's
    result for the summary."""
    state, manifest = run.state, run.manifest
    info = {
        "base_model": cfg.model.path, "base_fingerprint": run.base_fingerprint,  # merge compares it with its base
        "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
        "targets": cfg.lora.target_names(), "blocks": cfg.lora.blocks, "steps": cfg.train.max_steps,
        "shard_sets": [{"path": p, "manifest_sha256": manifest_hash(p)} for p in cfg.data.sets()],
        "shard_set_model": manifest.model.path,
        "validation_prompts": manifest.extras.validation_prompts,
        # What the captions were built from, for the release's model card (merge): the trigger words.
        "instance_prompt": _data_config(manifest).get("instance_prompt"),
        "caption_prefix": _data_config(manifest).get("caption_prefix") or None,
        "config": to_dict(cfg),
        # The config above is the last one; a resume that changed keys is recorded with its step.
        "config_changes": state.config_changes,
    }
    if cfg.train.mode == "full":
        from .full import EMA_TRANSFORMER_DIR, save_transformer, trained_names

        lora_info = ("rank", "alpha", "targets", "blocks")
        info = {k: v for k, v in info.items() if k not in lora_info}
        info.update(mode="full", trained=trained_names(run.transformer, cfg.full), dtype=str(run.weight_dtype)[6:])
        output = {"transformer_dir": save_transformer(cfg.out.dir, run.transformer, info)}
        ema_info = {**info, "ema": cfg.train.ema}
        if getattr(run, "ema_transformer", None) is not None:  # sharded: the EMA already gathered whole
            save_transformer(cfg.out.dir, run.ema_transformer, ema_info, EMA_TRANSFORMER_DIR)
        elif run.stepper.ema:
            with run.stepper.ema.swapped():
                save_transformer(cfg.out.dir, run.transformer, ema_info, EMA_TRANSFORMER_DIR)
    else:
        output = {"lora": save_lora(cfg.out.dir, run.transformer, info)}
        if run.stepper.ema:
            with run.stepper.ema.swapped():
                save_lora(cfg.out.dir, run.transformer, {**info, "ema": cfg.train.ema}, EMA_WEIGHT_NAME)
    history = state.history
    steps, losses, lrs = metric_series(metrics_path)
    # metrics.jsonl has each step's number and lr; the history from the checkpoint is whole even where the
    # file is not (a run resumed from another out.dir's checkpoint), and then only the losses are drawn.
    curve = loss_curve_png(losses, os.path.join(cfg.out.dir, "loss.png"), steps, lrs) \
        if len(losses) >= len(history) else loss_curve_png(history, os.path.join(cfg.out.dir, "loss.png"))
    by_sigma = loss_by_sigma_png(metrics_path, os.path.join(cfg.out.dir, "loss_by_sigma.png"))
    tenth = max(1, len(history) // 10)
    result = {**output, "metrics": metrics_path, "loss_curve": curve, "loss_by_sigma": by_sigma,
              "loss_change_at_equal_sigma": change_at_equal_sigma(metrics_path),
              "samples": last_samples, "steps": len(history),
              "first_loss": sum(history[:tenth]) / tenth if history else float("nan"),
              "last_loss": sum(history[-tenth:]) / tenth if history else float("nan"),
              "seconds": seconds, "mean_step_seconds": state.step_seconds / max(state.steps_timed, 1),
              "samples_per_second": state.samples / max(state.step_seconds, 1e-9), "data_read": data_read,
              "set_bytes": run.set_bytes}
    if run.device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    result["transformer"] = run.transformer  # for callers in the same process (tests, notebooks)
    return result


def summary(r: dict) -> str:
    lines = [f"LoRA: {r['lora']}" if "lora" in r else f"transformer: {r['transformer_dir']}",
             f"  {r['steps']} steps, {r['mean_step_seconds'] * 1000:.0f} ms/step ({r['samples_per_second']:.2f} samples/s), "
             f"{r['seconds']:.1f} s in all, "
             f"mean loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} (first/last tenth of the steps)"
             + (f"; at equal sigma the second half's loss is {r['loss_change_at_equal_sigma']:+.1%} vs the first"
                if r.get("loss_change_at_equal_sigma") is not None else ""),
             f"  metrics: {r['metrics']}   loss curves: {r['loss_curve']}, {r['loss_by_sigma']}"]
    reads = r.get("data_read") or []
    if reads:
        mb = ", ".join(f"{d['bytes'] / 1e6:.2f}" + (f" (kernel count {d['rchar'] / 1e6:.2f})" if d.get("rchar") else "")
                       for d in reads)
        lines.append(f"  shard data read per process: {mb} MB; the set holds {r['set_bytes'] / 1e6:.2f} MB"
                     + (f" (resume re-read {sum(d['resume_samples'] for d in reads)} buffered samples)"
                        if any(d["resume_samples"] for d in reads) else ""))
    if r["samples"]:
        lines.append(f"  validation images: {r['samples']}")
    if "peak_gpu_memory_gb" in r:
        lines.append(f"  peak GPU memory: {r['peak_gpu_memory_gb']:.2f} GiB")
    return "\n".join(lines)
