"""Validation images during training: SD3 pipeline sampling on the stored prompt embeddings, with
classifier-free guidance against the shard set's empty-prompt embeddings, decoded by the VAE decoder
only. No text encoder is needed, or imported."""
import os
from typing import List

import numpy as np
import torch
from PIL import Image, ImageDraw

from shards.common.hub import component_dir


def load_vae_decoder(root: str, device: torch.device):
    """The VAE decoder, kept on the host: it goes to `device` only while a validation decodes, so the GPU
    holds none of it between validations. bf16 on a GPU that computes in bf16 (the images agree with fp32
    within a few levels of 255, tested), fp32 elsewhere. Tiled decoding above the VAE's tile size keeps
    large validation images from needing the whole image's activations at once."""
    from diffusers import AutoencoderKL

    from .objective import native_bf16

    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    vae = AutoencoderKL.from_pretrained(component_dir(root, "vae"), torch_dtype=dtype)
    vae.encoder = None  # only decoding happens here
    vae.requires_grad_(False)
    return tiled_for_validation(vae).eval()


VALIDATION_TILE = 512  # pixels a side decoded at once


def tiled_for_validation(vae):
    """Tiled decoding in 512² tiles (blended over a quarter of a tile). diffusers' own tile size is the VAE's
    sample_size, 1024 for SD3, so a 1024² image would decode whole: 1.6 GiB of bf16 activations at once
    (modelled), where 512² tiles need a quarter of that."""
    vae.enable_tiling()
    vae.tile_sample_min_size = VALIDATION_TILE
    vae.tile_latent_min_size = VALIDATION_TILE // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device: torch.device) -> List[Image.Image]:
    """Latents to images one at a time (the decoder's activations are those of one image), with the decoder
    on `device` for the duration only."""
    vae.to(device)
    try:
        images = []
        for z in latents.split(1):
            a = decode_one(vae, z, device).cpu().numpy()
            images.append(Image.fromarray(np.ascontiguousarray(a)))
    finally:
        vae.to("cpu")
    return images


def decode_one(vae, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One latent [1, C, h, w] to its image as an [H, W, 3] uint8 tensor on `device` (the decoder already there)."""
    dtype = next(vae.parameters()).dtype
    shift = vae.config.shift_factor or 0.0
    pixels = vae.decode((z.to(device, torch.float32) / vae.config.scaling_factor + shift).to(dtype)).sample
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)


def dynamic_shift_mu(image_tokens: int, config: dict) -> float:
    """The shift exponent a flow-matching scheduler with `use_dynamic_shifting` needs for an image of this
    many tokens: linear in the token count between the config's (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), with the defaults diffusers' SD3 pipeline uses."""
    lo_n, hi_n = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (hi - lo) / (hi_n - lo_n)
    return image_tokens * slope + lo - slope * lo_n


@torch.no_grad()
def generate(transformer, vae, sched_config: dict, prompt_embeds, pooled, empty_embeds, empty_pooled,
             height: int, width: int, steps: int, guidance: float, seed: int, dtype: torch.dtype) -> List[Image.Image]:
    """Images for the stored prompt embeddings the way diffusers' StableDiffusion3Pipeline samples them
    (tested equal to it): `denoise`, then the VAE decoder. Written here rather than calling the pipeline:
    importing it imports the CLIP and T5 model code, which the trainer never loads."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = denoise(transformer, sched_config, prompt_embeds, pooled, empty_embeds, empty_pooled, height // f,
                      width // f, steps, guidance, seed, dtype)
    return decode(vae, latents, next(transformer.parameters()).device)


@torch.no_grad()
def denoise(transformer, sched_config: dict, prompt_embeds, pooled, empty_embeds, empty_pooled, h: int, w: int,
            steps: int, guidance: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Latents of `h`×`w` for each prompt as the SD3 pipeline makes them: the scheduler as configured, dynamic
    shifting included, Euler steps with classifier-free guidance against the shard set's empty-prompt
    embeddings, which is what the pipeline encodes for no negative prompt. Latents stay fp32 between steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = next(transformer.parameters()).device
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    p = transformer.config.patch_size
    mu = dynamic_shift_mu((h // p) * (w // p), scheduler.config) if scheduler.config.get("use_dynamic_shifting") \
        else None
    scheduler.set_timesteps(steps, device=device, **({"mu": mu} if mu is not None else {}))
    # The steps run in order from the first; without this the scheduler finds its place by searching its
    # timesteps on the device, and reads the answer on the host.
    scheduler.set_begin_index(0)
    n = prompt_embeds.shape[0]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, transformer.config.in_channels, h, w, generator=g).to(device)
    cond = torch.cat([empty_embeds.expand(n, -1, -1), prompt_embeds]).to(device, dtype)
    cond_pooled = torch.cat([empty_pooled.expand(n, -1), pooled]).to(device, dtype)
    was_training = transformer.training
    transformer.eval()
    try:
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]).to(dtype)
            out = transformer(hidden_states=x, timestep=t.expand(2 * n), encoder_hidden_states=cond,
                              pooled_projections=cond_pooled, return_dict=False)[0].float()
            uncond, text = out.chunk(2)
            latents = scheduler.step(uncond + guidance * (text - uncond), t, latents).prev_sample
    finally:
        transformer.train(was_training)
    return latents


def save_grid(images: List[Image.Image], prompts: List[str], path: str, label: str) -> str:
    """Images in a row, each with its prompt underneath; written atomically."""
    w, h = images[0].size
    cell_w = max(w, 160)
    grid = Image.new("RGB", (cell_w * len(images), h + 44), "white")
    d = ImageDraw.Draw(grid)
    for i, (im, p) in enumerate(zip(images, prompts)):
        grid.paste(im, (i * cell_w, 0))
        fits = cell_w // 6
        d.text((i * cell_w + 2, h + 4), p if len(p) <= fits else p[: fits - 1] + "…", fill="black")
    d.text((2, h + 26), label, fill=(90, 90, 90))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return path
