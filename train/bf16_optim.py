"""Training bf16 weights without fp32 master copies: each update reaches the weight through stochastic rounding.

A bf16 weight near 1.0 moves in steps of 2⁻⁷; an update smaller than half of that is rounded away every time, so a
long run at a small learning rate stalls. Rounding up with probability (distance to the lower bf16 value) / (step
between the two) makes the expected stored weight the exact one, so many small updates add up as in fp32, at 2
bytes per weight instead of the 4 more an fp32 master copy costs.
"""
from typing import Optional

import torch

from .sharded import local

_LOW_BITS = 1 << 16  # float32 bits below bfloat16's mantissa
_KEEP_HIGH = -_LOW_BITS  # int32 mask clearing those bits


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: Optional[torch.Generator] = None,
                      apply: Optional[torch.Tensor] = None) -> None:
    """dst (bfloat16) ← src (float32) rounded to one of its two neighbouring bf16 values, up with the probability
    that makes the expectation src. Adding uniform noise below bit 16 and clearing those bits does it: the sum
    carries into the kept bits exactly as often as the dropped part is large (for negative values too, as the
    bits are sign and magnitude). Non-finite values pass unchanged. `apply` (a bool tensor on the device): where
    false, dst keeps its value, decided without waiting for the device."""
    src = src.float().contiguous()
    noise = torch.randint(0, _LOW_BITS, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    rounded = ((src.view(torch.int32) + noise) & _KEEP_HIGH).view(torch.float32)
    out = torch.where(torch.isfinite(src), rounded, src)  # exact: the low bits are zero
    dst.copy_(out if apply is None else torch.where(apply, out, dst))


class WeightByWeight(torch.optim.Optimizer):
    """An optimizer stepped one weight at a time (a subclass's `step_weight(p, group, apply=None)`, which the fused
    backward step calls as each gradient is done, with `apply` false on the device for a weight whose update must
    not land; `step` calls it for every weight), rounding bf16 results stochastically with draws from one
    generator per device, seeded from `seed` and kept in the state dict, so a resumed run draws what the
    uninterrupted one would."""

    def __init__(self, params, defaults: dict, seed: int = 0):
        super().__init__(params, defaults)
        self.seed = seed
        self._generators = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        # Keyed by the device's type: each process trains on one device of it, and a state saved by the main
        # process (cuda:0) must reach every process's own generator, or DDP replicas would round apart.
        key = torch.device(device).type
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _own_device(self, kind: str) -> torch.device:
        """This process's device of a type: where its weights are."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type == kind:
                    return p.device
        return torch.device(kind)

    def _store(self, p: torch.nn.Parameter, value: torch.Tensor, apply: Optional[torch.Tensor]) -> None:
        """p ← value (by stochastic rounding into bf16); where `apply` is false, p keeps its value."""
        if p.dtype == torch.bfloat16:
            stochastic_round_(p, value, self._generator(p.device), apply)
        else:
            p.copy_(value if apply is None else torch.where(apply, value, p))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_weight(p, group)
        return loss

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["rounding_rng"] = {k: g.get_state() for k, g in self._generators.items()}
        return out

    def _load_rounding(self, state_dict: dict) -> dict:
        """state_dict without the generators' states, which it restores."""
        state_dict = dict(state_dict)
        for key, s in state_dict.pop("rounding_rng", {}).items():
            # Into this process's own generator of that device type (older checkpoints say "cuda:0").
            self._generator(self._own_device(torch.device(key).type)).set_state(s)
        return state_dict


class AdamWStochasticBf16(WeightByWeight):
    """AdamW (decoupled weight decay, bias-corrected moments in fp32) whose bf16 parameters take each step's new
    value by stochastic rounding; fp32 parameters are updated as torch's AdamW updates them. The rounding draws come
    from one generator per device, seeded from `seed` and kept in the state dict, so a resumed run draws what the
    uninterrupted one would."""

    def __init__(self, params, lr: float = 1e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), seed)

    @torch.no_grad()
    def step_weight(self, p: torch.nn.Parameter, group: dict, apply: Optional[torch.Tensor] = None) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        w, grad = local(p), local(p.grad).float()  # a sharded weight: this process's shard, its moments alone
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(w, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(w, dtype=torch.float32)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        # fp32 weights update in place, unless the update may not land (then into a copy, kept or not).
        value = w.detach().to(torch.float32, copy=apply is not None)
        self._store(w, value.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1 ** t)), apply)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = self._load_rounding(state_dict)
        super().load_state_dict(state_dict)
        # torch's loader casts floating state to each parameter's dtype; the moments stay fp32 (bf16 moments would
        # make a resumed run differ from the uninterrupted one).
        saved = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                for name in ("exp_avg", "exp_avg_sq"):
                    if index in saved and name in saved[index]:
                        self.state[p][name] = saved[index][name].to(p.device, torch.float32, copy=True)


class PerWeightBf16(WeightByWeight):
    """Any torch optimizer (bitsandbytes' 8-bit AdamW, Adafactor) for bf16 weights, one weight at a time: the
    weight and its gradient are copied to fp32 scratch, an optimizer of that weight's own steps the copy, and the
    result returns by stochastic rounding. One weight's fp32 copy exists at a time (SD3 Medium's largest matrix:
    36 MiB), never an fp32 master copy of the model (8 GiB). `make(params)` builds the inner optimizer; the outer
    param groups carry the hyperparameters the schedule and a resume set, copied into each inner one before its
    step."""

    def __init__(self, params, make, defaults: dict, seed: int = 0):
        super().__init__(params, defaults, seed)
        self._make = make
        self._inner = {}  # weight -> (its fp32 scratch Parameter, its optimizer)

    def _pair(self, p: torch.nn.Parameter):
        if p not in self._inner:
            scratch = torch.nn.Parameter(torch.empty(0, device=p.device))
            self._inner[p] = (scratch, self._make([scratch]))
        return self._inner[p]

    @torch.no_grad()
    def step_weight(self, p: torch.nn.Parameter, group: dict, apply: Optional[torch.Tensor] = None) -> None:
        scratch, inner = self._pair(p)
        for g in inner.param_groups:
            g.update({k: v for k, v in group.items() if k != "params" and k in g})
        # An fp32 weight is stepped in place, unless the update may not land (then a copy is).
        w = local(p)  # a sharded weight: this process's shard
        scratch.data = w.detach().to(torch.float32, copy=apply is not None)
        scratch.grad = local(p.grad).float()
        inner.step()
        self._store(w, scratch.data, apply)
        scratch.grad = None
        scratch.data = torch.empty(0, device=p.device)

    def _weights(self):
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["inner"] = [self._inner[p][1].state_dict() if p in self._inner else None for p in self._weights()]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = self._load_rounding(state_dict)
        inner = state_dict.pop("inner")
        super().load_state_dict(state_dict)
        for p, saved in zip(self._weights(), inner):
            if saved is None:
                continue
            scratch, opt = self._pair(p)
            scratch.data = torch.empty(local(p).shape, device=p.device)  # the loader casts state to the weight's shape
            opt.load_state_dict(saved)
            scratch.data = torch.empty(0, device=p.device)
