"""merge.verify=true: read the release back and check it against the base and the LoRAs.

Two checks:
- every tensor: a LoRA target must hold `W_base + sum(scale * B @ A)` (alpha / rank inside the scale),
  computed here in fp32, up to the rounding of out.dtype; the worst relative error
  |(W_merged - W_base) - delta| / |delta| (Frobenius norms) is reported. Every other tensor must equal the
  base tensor cast to out.dtype, bit for bit.
- a forward probe, for transformers small enough to hold twice in memory: the base transformer with the
  LoRAs applied unmerged (each target linear layer's output gets `scale * (x @ A^T) @ B^T` added) against
  the same transformer with the release's weights, on one seeded input.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from shards.common.errors import DataError

from .fold import OUT_DTYPES, modules_for
from .lora import Updates
from .sources import Source

# The probe's output may differ by what rounding every weight to out.dtype does to a whole forward pass.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class VerifyReport:
    tensors: int  # tensors compared
    targets: int  # of them, LoRA targets
    worst_relative_error: float  # over the targets: |(W_merged - W_base) - delta| / |delta|
    worst_tensor: str
    probe_relative_error: Optional[float] = None  # |merged(x) - unmerged(x)| / |unmerged(x)|; None when skipped
    probe_skipped: str = ""  # why there was no probe

    def lines(self):
        if not self.targets:
            yield f"verify: {self.tensors} tensors read back, each equal to its source"
        else:
            yield (f"verify: {self.tensors} tensors read back; {self.targets} LoRA targets match base + scale * B @ A "
                   f"(worst relative error {self.worst_relative_error:.2e}, in '{self.worst_tensor}'), every other "
                   "tensor equals the base")
        if self.probe_relative_error is not None:
            yield f"verify: forward probe, merged vs base with the LoRAs unmerged: relative error {self.probe_relative_error:.2e}"
        else:
            yield f"verify: no forward probe ({self.probe_skipped})"


def _target_dtype(base: torch.Tensor, dtype: str) -> torch.dtype:
    return OUT_DTYPES.get(dtype, base.dtype) if base.is_floating_point() else base.dtype


def check_target(name: str, base: torch.Tensor, merged: torch.Tensor, modules, dtype: str) -> float:
    """The relative error of one merged LoRA target; raises if it is beyond out.dtype's rounding."""
    delta = sum((m.delta() for m in modules), torch.zeros(()))
    expected = base.float() + delta
    got = merged.float()
    target = _target_dtype(base, dtype)
    if merged.dtype != target or merged.shape != base.shape:
        raise DataError(f"verify: '{name}' is {merged.dtype} {tuple(merged.shape)} in the release, expected "
                        f"{target} {tuple(base.shape)}")
    info = torch.finfo(target)
    # Rounding to `target` moves a value by at most half its spacing (eps/2 * |x|) or the subnormal step; the
    # fp32 sums here and in the merge may round differently by a few fp32 steps of the terms' sizes.
    terms = base.float().abs() + sum((m.delta().abs() for m in modules), torch.zeros(()))
    allowed = info.eps / 2 * expected.abs() + 4 * torch.finfo(torch.float32).eps * terms + info.smallest_normal
    excess = (got - expected).abs() - allowed
    if (excess > 0).any():
        i = int(excess.argmax())
        raise DataError(f"verify: '{name}' differs from base + LoRA beyond {target} rounding (element {i}: "
                        f"{got.reshape(-1)[i].item():.6g} vs {expected.reshape(-1)[i].item():.6g}); the release is wrong")
    norm = float(delta.norm())
    return float(((got - base.float()) - delta).norm()) / norm if norm > 0 else 0.0


def verify_tensors(base: Source, out: Source, updates: Updates, dtype: str, progress: bool = True) -> VerifyReport:
    """Compare every tensor of the release (`out`, read under diffusers names) with base + LoRAs."""
    if set(out.names) != set(base.names):
        extra, missing = sorted(set(out.names) - set(base.names)), sorted(set(base.names) - set(out.names))
        raise DataError(f"verify: the release's transformer has {len(out.names)} tensors, the base "
                        f"{len(base.names)} (first missing: {missing[:1]}, first extra: {extra[:1]})")
    worst, worst_name, targets = 0.0, "", 0
    with tqdm(base.names, desc="verify", unit="tensor", disable=not progress) as bar:
        for name in bar:
            b, o = base.get(name), out.get(name)
            modules = modules_for(updates, name)
            if modules:
                targets += 1
                err = check_target(name, b, o, modules, dtype)
                if err >= worst:
                    worst, worst_name = err, name
            elif o.dtype != _target_dtype(b, dtype) or not torch.equal(o, b.to(_target_dtype(b, dtype))):
                raise DataError(f"verify: '{name}' is no LoRA target but differs from the base tensor; the release is wrong")
    return VerifyReport(tensors=len(base.names), targets=targets, worst_relative_error=worst, worst_tensor=worst_name)


def probe_inputs(config, seed: int = 0) -> Dict[str, torch.Tensor]:
    """One small seeded input for an SD3Transformer2DModel with this config."""
    g = torch.Generator().manual_seed(seed)
    patch = config.patch_size
    side = min(32, config.pos_embed_max_size * patch if config.pos_embed_max_size else 32) // patch * patch
    return {
        "hidden_states": torch.randn(1, config.in_channels, side, side, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([500.0]),
    }


def _add_lora_hook(modules):
    def hook(_, inputs, output):
        x = inputs[0].float()
        for m in modules:
            output = output + m.scale * ((x @ m.down.float().T) @ m.up.float().T)
        return output
    return hook


def forward_probe(transformer_dir: str, out: Source, updates: Updates) -> Tuple[float, torch.dtype]:
    """Relative error between the base with the LoRAs unmerged and the release's weights, in fp32."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32).eval()
    inputs = probe_inputs(model.config)
    hooks = [model.get_submodule(name).register_forward_hook(_add_lora_hook(modules))
             for name, modules in updates.items()]
    try:
        with torch.no_grad():
            reference = model(**inputs).sample
    finally:
        for h in hooks:
            h.remove()
    out_dtype = out.get(next(iter(updates)) + ".weight").dtype
    state = {name: out.get(name).float() for name in out.names}
    model.load_state_dict(state, strict=True)
    del state
    with torch.no_grad():
        got = model(**inputs).sample
    return float((got - reference).norm() / reference.norm()), out_dtype


def probe_or_skip(report: VerifyReport, transformer_dir: Optional[str], base: Source, out: Source, updates: Updates,
                  max_params: int) -> VerifyReport:
    """Run the forward probe when there is a config to build the model from and the model is small enough."""
    params = sum(torch.Size(base.shape(n)).numel() for n in base.names)
    if transformer_dir is None:
        report.probe_skipped = "a single-file base has no model config to build the transformer from"
    elif params > max_params:
        report.probe_skipped = f"{params:,} parameters > merge.probe_max_params {max_params:,}"
    else:
        err, dtype = forward_probe(transformer_dir, out, updates)
        report.probe_relative_error = err
        limit = PROBE_TOLERANCE.get(dtype, 1e-4)
        if not err <= limit:
            raise DataError(f"verify: the merged transformer's output differs from the base with the LoRAs applied "
                            f"by {err:.2e} (relative; allowed {limit:.0e} for {dtype}); the release is wrong")
    return report
