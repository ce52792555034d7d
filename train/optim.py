"""Optimizers, learning-rate schedules and an EMA of the trained weights."""
import contextlib
import math
from typing import List, Optional

import torch

from .config import TrainLoopConfig
from .sharded import local


def make_optimizer(params: List[torch.nn.Parameter], t: TrainLoopConfig) -> torch.optim.Optimizer:
    # Sharded weights too: bitsandbytes' kernels and Adafactor's factored statistics take plain tensors, and the
    # per-weight optimizers step each process's plain shard.
    if t.fused_step or t.sharding == "fsdp" or any(p.dtype == torch.bfloat16 for p in params):
        return per_weight_optimizer(params, t)
    return _plain_optimizer(params, t)


def _plain_optimizer(params: List[torch.nn.Parameter], t: TrainLoopConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                   weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate, so the schedule below is the only thing that moves it.
        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay)


def per_weight_optimizer(params: List[torch.nn.Parameter], t: TrainLoopConfig) -> torch.optim.Optimizer:
    """An optimizer that can step one weight at a time (`step_weight`, what the fused backward step calls), and
    whose bf16 weights (full mode on a GPU) take each update by stochastic rounding, so updates smaller than a
    bf16 step add up instead of being rounded away (train.bf16_optim). AdamW does it in its own step; the other
    optimizers step an fp32 copy of the weight."""
    from .bf16_optim import AdamWStochasticBf16, PerWeightBf16

    if t.optimizer == "adamw":
        return AdamWStochasticBf16(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                   weight_decay=t.weight_decay, seed=t.seed)
    settings = {"lr": t.lr, "weight_decay": t.weight_decay}  # what the schedule and a resume may change
    if t.optimizer == "adamw8bit":
        settings.update(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    return PerWeightBf16(params, lambda scratch: _plain_optimizer(scratch, t), settings, seed=t.seed)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - progress
    return 1.0


def make_schedule(opt: torch.optim.Optimizer, t: TrainLoopConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.lr_schedule, t.warmup_steps, t.max_steps))


class Ema:
    """Exponential moving average of the trained parameters, kept in fp32 on `device` (None: beside each
    parameter). Updated every `every` applied steps with the decay those steps would have had together
    (decay^every), so an EMA on the host costs one copy of the weights from the GPU per interval."""

    def __init__(self, params: List[torch.nn.Parameter], decay: float, every: int = 1,
                 device: Optional[torch.device] = None):
        self.params, self.decay, self.every, self.device = params, decay, every, device
        self.shadow = self._copies()
        self.steps = 0  # applied steps since the EMA started

    def _copies(self) -> List[torch.Tensor]:
        return [local(p).detach().to(self.device or p.device, torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        if self.steps % self.every:
            return
        weight = 1 - self.decay ** self.every
        for s, p in zip(self.shadow, self.params):  # a sharded weight: this process's shard
            s.lerp_(local(p).detach().to(s.device, torch.float32), weight)

    def restart(self) -> None:
        """Start afresh from the weights trained so far (an EMA switched on at resume)."""
        self.shadow, self.steps = self._copies(), 0

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow], "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.steps = state.get("steps", 0)

    @contextlib.contextmanager
    def swapped(self):
        """Inside this context the parameters hold the EMA values (to save or sample them). The trained values
        wait on the host: a second copy of a fully trained transformer would not fit beside it on the GPU."""
        saved = [local(p).detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                local(p).copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    local(p).copy_(s)
