"""What a resumed run does with each config key that differs from the checkpoint's: one rule per key.

- refuse: the saved state cannot carry over (another LoRA shape, another optimizer's state).
- stream: allowed, but the data order and draws differ from a run never interrupted.
- applied: the new value takes effect from the resumed step, said once; the LoRA file records it.
- quiet: where and how the run reports or is placed, not what it trains.

Every key of the train schema has a rule (a test walks the schema), so a new key must be given one.
"""
from typing import List, Tuple

from shards.common.config import default_keys, flat_keys, to_dict
from shards.common.errors import UsageError

REFUSE = ("lora.rank", "lora.alpha", "lora.targets", "lora.blocks", "train.optimizer", "train.mode", "full.blocks",
          "full.include", "train.sharding")
STREAM = ("train.batch_size", "train.grad_accum", "train.seed", "data.shards", "data.shuffle_buffer")
APPLIED = ("train.lr", "train.weight_decay", "train.adam_beta1", "train.adam_beta2", "train.adam_eps",
           "train.max_grad_norm", "train.fused_step", "train.lr_schedule", "train.warmup_steps", "train.max_steps",
           "train.ema", "train.ema_every",
           "train.mixed_precision", "model.path", "model.revision", "model.precision", "model.quantize",
           "data.flip", "lora.dropout", "loss.")
QUIET = ("out.", "resume", "train.device", "train.ema_device", "train.deterministic", "train.log_every", "train.trackers", "train.max_bad_steps",
         "model.gradient_checkpointing", "model.compile", "validation.", "checkpoint.")
# The keys that decide the learning rate of a step: a change is reported as the rate before and after.
SCHEDULE = ("train.lr", "train.lr_schedule", "train.warmup_steps", "train.max_steps")


def rule(key: str) -> str:
    for name, keys in (("refuse", REFUSE), ("stream", STREAM), ("applied", APPLIED), ("quiet", QUIET)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            return name
    raise KeyError(f"config key '{key}' has no resume rule")


def _lora_targets(value):
    from .config import TARGET_PRESETS

    return list(TARGET_PRESETS[value]) if isinstance(value, str) and value in TARGET_PRESETS else value


def changes(saved_config: dict, cfg, path: str) -> List[Tuple[str, object, object, str]]:
    """(key, saved value, new value, rule) for every changed key; raises for a key whose change is refused."""
    before, now = flat_keys(saved_config), flat_keys(to_dict(cfg))
    # A key an older run's config lacks had its default then: the behaviour it stands for came later.
    before = {**{k: v for k, v in default_keys(type(cfg)).items() if k in now}, **before}
    before["lora.targets"], now["lora.targets"] = _lora_targets(before.get("lora.targets")), cfg.lora.target_names()
    # Keys this version no longer has (an older run's) are past; Adafactor has no Adam betas or epsilon.
    unused = {k for k in before if k not in now}
    if cfg.train.optimizer == "adafactor":
        unused |= {"train.adam_beta1", "train.adam_beta2", "train.adam_eps"}
    out = [(k, before.get(k), now.get(k), rule(k)) for k in sorted(set(before) | set(now))
           if before.get(k) != now.get(k) and k not in unused]
    refused = [f"{k} {a} -> {b}" for k, a, b, r in out if r == "refuse"]
    if refused:
        raise UsageError(f"resume: {path} was trained with other settings that its saved state cannot follow "
                         f"({'; '.join(refused)}); use the saved values, resume=none, or another out.dir")
    return out


def report(found: List[Tuple[str, object, object, str]], step: int, path: str, lr_before: float,
           lr_after: float) -> List[str]:
    """The lines a resumed run prints about its changed keys (nothing when none changed)."""
    lines = []
    stream = [f"{k} {a} -> {b}" for k, a, b, r in found if r == "stream"]
    if stream:
        lines.append(f"train: warning: resuming {path} with changed {'; '.join(stream)}: the data order and draws "
                     "differ from an uninterrupted run")
    applied = [f"{k} {a} -> {b}" for k, a, b, r in found if r == "applied"]
    if applied:
        lines.append(f"train: warning: resuming {path} with changed {'; '.join(applied)}: the new values apply "
                     f"from step {step + 1} on (the LoRA file records the change)")
    if abs(lr_after - lr_before) > 1e-12 * max(abs(lr_before), 1e-30):
        lines.append(f"train: warning: the learning rate of step {step + 1} is {lr_after:.4g} with the new schedule "
                     f"settings; the saved run would have used {lr_before:.4g}")
    return lines


def recorded(found: List[Tuple[str, object, object, str]], step: int) -> List[dict]:
    """What the run's state (and so the LoRA file) keeps of a resume's changed keys."""
    kept = [{"key": k, "from": a, "to": b} for k, a, b, r in found if r in ("applied", "stream")]
    return [{"step": step, "changes": kept}] if kept else []
