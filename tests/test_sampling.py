"""Validation images are diffusers' own: the same pixels as StableDiffusion3Pipeline for the stored
embeddings, seed and steps, with the scheduler as configured (dynamic shifting included)."""
import numpy as np
import pytest
import torch

from shards import read_extras


def test_validation_images_equal_the_pipelines_whatever_the_scheduler_config(tiny_model, shard_set_fp32):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from train.sampling import generate, load_vae_decoder

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    extras = read_extras(shard_set_fp32)
    embeds = (extras["validation_prompt_embeds"], extras["validation_pooled_prompt_embeds"])
    empty = (extras["empty_prompt_embeds"], extras["empty_pooled_prompt_embeds"])
    n = embeds[0].shape[0]
    plain = dict(pipe.scheduler.config)
    # As some SD3.5 fine-tunes ship it: the shift follows the image's token count (mu).
    shifting = {**plain, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096}
    with pytest.raises(ValueError, match="mu"):  # what a sampler that calls set_timesteps by hand runs into
        FlowMatchEulerDiscreteScheduler.from_config(shifting).set_timesteps(4)
    vae = load_vae_decoder(tiny_model, torch.device("cpu"))
    got = {}
    for name, config in (("plain", plain), ("shifting", shifting)):
        images = generate(pipe.transformer, vae, config, *embeds, *empty, 64, 64, 4, 5.0, 7, torch.float32)
        assert len(images) == n and images[0].size == (64, 64)
        got[name] = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        want = pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1],
                    negative_prompt_embeds=empty[0].expand(n, -1, -1), negative_pooled_prompt_embeds=empty[1].expand(n, -1),
                    height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(7), output_type="np").images
        assert np.abs(got[name] - want).max() <= 1 / 255 + 1e-6, name  # the uint8 rounding of the PNG
    assert np.abs(got["plain"] - got["shifting"]).max() > 0.02  # the shifted schedule is another schedule


def test_bf16_decoding_one_image_at_a_time_agrees_with_fp32_batches(tiny_model):
    """The decoder's choices for a GPU (bf16, one image per call) give the images of the fp32 batch decode
    within a few levels; decoding leaves the decoder on the host."""
    from diffusers import AutoencoderKL

    from train.sampling import decode

    vae = AutoencoderKL.from_pretrained(f"{tiny_model}/vae").eval()
    latents = torch.randn(3, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    want = ((whole.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    fp32 = np.stack([np.asarray(im, dtype=np.float64) for im in decode(vae, latents, torch.device("cpu"))])
    assert np.abs(fp32 - want).max() <= 1  # one call per image: the batch's images up to uint8 rounding
    half = AutoencoderKL.from_pretrained(f"{tiny_model}/vae", torch_dtype=torch.bfloat16).eval()
    bf16 = np.stack([np.asarray(im, dtype=np.float64) for im in decode(half, latents, torch.device("cpu"))])
    diff = np.abs(bf16 - want)  # measured: mean 0.74, 99th percentile 4, max 15 levels of 255
    assert diff.mean() <= 1.5 and np.percentile(diff, 99) <= 6, (diff.mean(), np.percentile(diff, 99))
    assert all(p.device.type == "cpu" for p in half.parameters())
