"""Validation images during training: FlowMatch Euler sampling with classifier-free guidance against
the shard set's empty-prompt embeddings, decoded by the VAE decoder only. No text encoder is needed."""
import os
from typing import List

import numpy as np
import torch
from PIL import Image, ImageDraw

from shards.modelpath import component_dir


def load_vae_decoder(root: str, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(component_dir(root, "vae"), torch_dtype=torch.float32)
    vae.encoder = None  # only decoding happens here
    vae.requires_grad_(False)
    return vae.to(device).eval()


@torch.no_grad()
def generate(transformer, vae, sched_config: dict, prompt_embeds, pooled, empty_embeds, empty_pooled,
             height: int, width: int, steps: int, guidance: float, seed: int, dtype: torch.dtype) -> List[Image.Image]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = next(transformer.parameters()).device
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    scheduler.set_timesteps(steps, device=device)
    n = prompt_embeds.shape[0]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, transformer.config.in_channels, height // f, width // f, generator=g).to(device)
    cond = torch.cat([empty_embeds.expand(n, -1, -1), prompt_embeds]).to(device, dtype)
    cond_pooled = torch.cat([empty_pooled.expand(n, -1), pooled]).to(device, dtype)
    was_training = transformer.training
    transformer.eval()
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]).to(dtype)
        out = transformer(hidden_states=x, timestep=t.expand(2 * n), encoder_hidden_states=cond,
                          pooled_projections=cond_pooled, return_dict=False)[0].float()
        uncond, text = out.chunk(2)
        latents = scheduler.step(uncond + guidance * (text - uncond), t, latents).prev_sample
    transformer.train(was_training)
    shift = vae.config.shift_factor or 0.0
    pixels = vae.decode(latents / vae.config.scaling_factor + shift).sample
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


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
