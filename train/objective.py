"""The training objective: SD3's rectified-flow loss on one micro-batch; each sample's random draws come from a
generator of its own, seeded by the run's seed, the step and the sample's key."""
import hashlib
from collections import Counter
from typing import List

import torch

from shards.common.dtypes import STORAGE_DTYPES
from shards.manifest import Manifest

from . import flow
from .config import LoraConfig, ModelConfig, TrainConfig
from .model import add_lora


def native_bf16(device: torch.device) -> bool:
    """A CUDA device that computes in bf16 itself (compute capability 8.0 on: A100, H100, RTX 30xx and
    later). T4 and V100 only emulate it, slowly, so `auto` gives them fp16 with a gradient scaler."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtypes(cfg: TrainConfig, device: torch.device):
    """(frozen weights' dtype, mixed-precision name: 'bf16' | 'fp16' | 'no')."""
    half = "bf16" if native_bf16(device) else "fp16"
    weights = cfg.model.precision
    if weights == "auto":
        weights = half if device.type == "cuda" else "fp32"
        if weights == "fp16" and cfg.train.mode == "full":  # fp16 weights would lose small updates and overflow
            weights = "fp32"
    amp = cfg.train.mixed_precision
    if amp == "auto":
        amp = half if device.type == "cuda" else "no"
    return STORAGE_DTYPES[weights], amp


def prepare_trainable(transformer, cfg: TrainConfig):
    """The run's trainable parameters on the transformer as its train.mode asks: LoRA adapters on the frozen
    weights, or (full) the transformer's own chosen weights, which train in the weights' dtype."""
    if cfg.train.mode == "full":
        from .full import unfreeze

        return _ready(transformer, unfreeze(transformer, cfg.full), cfg.model)
    return prepare_lora(transformer, cfg.lora, cfg.model)


def prepare_lora(transformer, lora: LoraConfig, model: ModelConfig):
    """LoRA on the frozen transformer as training runs it; returns the trainable parameters."""
    params = add_lora(transformer, lora)
    for p in params:  # LoRA weights train in fp32 whatever the base precision
        p.data = p.data.float()
    return _ready(transformer, params, model)


def _ready(transformer, params, model: ModelConfig):
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if model.compile:
        for block in transformer.transformer_blocks:
            block.compile()
    transformer.train()
    return params


class Objective:
    """One micro-batch's loss; owns the generator so every random draw is reproducible.

    Mixed precision is not applied here: the model the run calls is prepared by its Accelerator, whose
    forward runs under autocast."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, extras: dict, sched: dict, device, weight_dtype):
        self.cfg, self.device, self.weight_dtype = cfg.loss, device, weight_dtype
        self.flip = cfg.data.flip if manifest.flipped_latents else 0.0
        shift = cfg.loss.shift if cfg.loss.shift is not None else sched.get("shift", 1.0)
        self.table = flow.sigma_table(sched.get("num_train_timesteps", 1000), shift)
        self.shift_factor = manifest.vae.shift_factor
        self.scaling_factor = manifest.vae.scaling_factor
        self.empty = tuple(extras[k].float().to(device) for k in ("empty_prompt_embeds", "empty_pooled_prompt_embeds"))
        self.seed = cfg.train.seed

    def __call__(self, model, batch, step: int):
        """(mean loss, sigmas, per-sample losses), all on the device; nothing here waits for the device.

        `step` is the optimizer step (from 0) the micro-batch belongs to: with the sample keys it seeds the draws,
        so a sample gets the same noise, sigma, flip and dropout whichever process or micro-batch holds it, and
        a resumed run needs no generator state."""
        c, dev = self.cfg, self.device
        gens = sample_generators(self.seed, step, batch["keys"])

        def each(draw):  # one draw per sample from its own generator, stacked on the host
            return torch.cat([draw(g) for g in gens])

        def put(name):  # stored dtype to the device first (asynchronous from the loader's pinned memory), then math
            return batch[name].to(dev, non_blocking=True)

        # A set stored without the latent std trains on the posterior mean (no sampling noise on the latent).
        mean, std = put("latent_mean"), (put("latent_std") if "latent_std" in batch else None)
        if self.flip > 0 and "latent_mean_flip" in batch:  # the mirrored image's stored latent: a flip without a VAE
            use = (each(lambda g: torch.rand(1, generator=g)) < self.flip)[:, None, None, None].to(dev)
            mean = torch.where(use, put("latent_mean_flip"), mean)
            if std is not None:
                std = torch.where(use, put("latent_std_flip"), std)
        one = (1, *mean.shape[1:])
        eps = each(lambda g: torch.randn(one, generator=g)).to(dev)  # noise drawn on the CPU
        x0 = flow.model_latents(mean, std, eps, self.shift_factor, self.scaling_factor)
        noise = each(lambda g: torch.randn(one, generator=g)).to(dev)
        sigma = flow.sigmas_for(each(lambda g: flow.sample_u(c.timestep_sampling, 1, g, c.logit_mean, c.logit_std,
                                                             c.mode_scale)), self.table).to(dev)
        noisy = flow.noisy_latents(x0, noise, sigma)
        embeds, pooled = put("prompt_embeds").float(), put("pooled_prompt_embeds").float()
        if c.caption_dropout > 0:
            drop = (each(lambda g: torch.rand(1, generator=g)) < c.caption_dropout).to(dev)  # the batch itself is left as it is
            embeds = torch.where(drop[:, None, None], self.empty[0], embeds)
            pooled = torch.where(drop[:, None], self.empty[1], pooled)
        out = model(hidden_states=noisy.to(self.weight_dtype), timestep=sigma * 1000,
                    encoder_hidden_states=embeds.to(self.weight_dtype),
                    pooled_projections=pooled.to(self.weight_dtype), return_dict=False)[0]
        per_sample = flow.flow_matching_loss(out, x0, noise, noisy, sigma, c.weighting, c.precondition_outputs,
                                             reduce=False)
        if c.prior_weight != 1.0:  # class images of DreamBooth prior preservation
            prior = torch.tensor(batch["prior"], device=per_sample.device)
            per_sample = per_sample * torch.where(prior, c.prior_weight, 1.0)
        return per_sample.mean(), sigma, per_sample.detach()


def sample_generators(seed: int, step: int, keys: List[str]) -> List[torch.Generator]:
    """A generator per sample of a micro-batch, seeded from (run seed, step, key, how often the key came before in
    this micro-batch): independent of the batch's order, its neighbours and the number of processes. A key that
    trains twice in one step from different micro-batches or processes (a set smaller than a step's samples, or
    one image in two sets) draws alike both times."""
    seen, gens = Counter(), []
    for key in keys:
        seen[key] += 1
        digest = hashlib.blake2b(f"{seed}/{step}/{key}/{seen[key]}".encode(), digest_size=8).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
    return gens
