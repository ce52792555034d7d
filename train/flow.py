"""SD3 rectified-flow objective as pure functions (diffusers train_dreambooth_lora_sd3 semantics).

Every random draw takes an explicit torch.Generator so a run is reproducible and resumable.
"""
import math

from typing import Optional

import torch

TIMESTEP_SAMPLING = ("logit_normal", "mode", "cosmap", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def sigma_table(num_train_timesteps: int = 1000, shift: float = 3.0) -> torch.Tensor:
    """The scheduler's training sigmas, highest first: s = t/N for t = N..1, shifted as
    shift·s / (1 + (shift − 1)·s) (FlowMatchEulerDiscreteScheduler without dynamic shifting)."""
    t = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    s = t / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


def sample_u(scheme: str, batch: int, generator: torch.Generator, logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """Density over [0, 1) used to pick training timesteps."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    u = torch.rand(batch, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u  # uniform; cosmap differs only in the loss weighting


def sigmas_for(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index the sigma table as diffusers does: idx = floor(u · N)."""
    idx = (u * len(table)).long().clamp(0, len(table) - 1)
    return table[idx]


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def loss_weighting(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    return torch.ones_like(sigma, dtype=torch.float32)


def flow_matching_loss(model_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                       sigma: torch.Tensor, weighting: str = "none", precondition_outputs: bool = True,
                       reduce: bool = True) -> torch.Tensor:
    """Per-sample mean of weighting·(pred − target)², then the batch mean (or per-sample when not `reduce`).

    precondition_outputs: pred = out·(−σ) + noisy, target = x0; else pred = out, target = noise − x0.
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).float()
    if precondition_outputs:
        pred, target = model_out.float() * (-s) + noisy.float(), x0.float()
    else:
        pred, target = model_out.float(), noise.float() - x0.float()
    w = loss_weighting(weighting, sigma).view_as(s)
    per_sample = (w * (pred - target) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    return per_sample.mean() if reduce else per_sample


def model_latents(mean: torch.Tensor, std: Optional[torch.Tensor], eps: torch.Tensor,
                  shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Sample z = mean + std·eps from the stored VAE posterior (its mean when no std is stored), then the model's
    input space (z − shift)·scale. The caller draws eps either way, so the rest of a run's randomness is unchanged."""
    z = mean.float() + std.float() * eps.to(mean.device) if std is not None else mean.float()
    return (z - shift_factor) * scaling_factor
