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
    vae.enable_tiling()
    return vae.eval()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device: torch.device) -> List[Image.Image]:
    """Latents to images one at a time (the decoder's activations are those of one image), with the decoder
    on `device` for the duration only."""
    dtype = next(vae.parameters()).dtype
    shift = vae.config.shift_factor or 0.0
    vae.to(device)
    try:
        images = []
        for z in latents.split(1):
            pixels = vae.decode((z.to(device, torch.float32) / vae.config.scaling_factor + shift).to(dtype)).sample
            a = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray(np.ascontiguousarray(a)))
            del pixels
    finally:
        vae.to("cpu")
    return images


@torch.no_grad()
def generate(transformer, vae, sched_config: dict, prompt_embeds, pooled, empty_embeds, empty_pooled,
             height: int, width: int, steps: int, guidance: float, seed: int, dtype: torch.dtype) -> List[Image.Image]:
    """Images for the stored prompt embeddings, sampled by diffusers' own StableDiffusion3Pipeline with no
    text encoders: the scheduler as configured (dynamic shifting included), its timesteps and guidance, so
    the images are what a user of the LoRA will see in diffusers. Classifier-free guidance runs against
    the shard set's empty-prompt embeddings, which is what the pipeline encodes for no negative prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    device = next(transformer.parameters()).device
    # No VAE in the pipeline: it would decide the pipeline's device while it waits on the host.
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_config), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the latent size comes from it
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
    return decode(vae, latents, device)


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
