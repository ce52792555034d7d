"""Validation images during training: diffusers' SD3 pipeline on the stored prompt embeddings, with
classifier-free guidance against the shard set's empty-prompt embeddings, decoded by the VAE decoder
only. No text encoder is needed."""
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
    """Images for the stored prompt embeddings, sampled by diffusers' own StableDiffusion3Pipeline with no
    text encoders: the scheduler as configured (dynamic shifting included), its timesteps and guidance, so
    the images are what a user of the LoRA will see in diffusers. Classifier-free guidance runs against
    the shard set's empty-prompt embeddings, which is what the pipeline encodes for no negative prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    device = next(transformer.parameters()).device
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_config), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    n = prompt_embeds.shape[0]
    was_training = transformer.training
    transformer.eval()
    try:
        latents = pipe(prompt_embeds=prompt_embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                       negative_prompt_embeds=empty_embeds.expand(n, -1, -1).to(device, dtype),
                       negative_pooled_prompt_embeds=empty_pooled.expand(n, -1).to(device, dtype),
                       height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images
    finally:
        transformer.train(was_training)
    # Decoded here rather than by the pipeline: the decoder runs in fp32 whatever the transformer's dtype.
    shift = vae.config.shift_factor or 0.0
    pixels = vae.decode(latents.float() / vae.config.scaling_factor + shift).sample
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
