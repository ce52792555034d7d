"""CLIP-L, CLIP-G, T5 and the VAE encoder, computing exactly what StableDiffusion3Pipeline computes."""
import json
import os
from typing import List

import torch

from shards.format import TORCH_DTYPES as _DTYPES
from shards.modelpath import component_dir


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _load_t5(root: str, precision: str, device: torch.device):
    from transformers import BitsAndBytesConfig, T5EncoderModel

    path = component_dir(root, "text_encoder_3")
    if precision in ("nf4", "int8"):
        # bf16 where the GPU computes in it (compute capability 8.0 on); T4 and V100 only emulate it. Not fp16:
        # T5 v1.1's activations exceed its range.
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        compute = torch.bfloat16 if native_bf16 else torch.float32
        if precision == "nf4":
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        else:
            q = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes quantizes while moving weights to the device, so load there directly.
        return T5EncoderModel.from_pretrained(path, quantization_config=q, dtype=compute,
                                              device_map={"": device}).eval()
    return T5EncoderModel.from_pretrained(path, dtype=_DTYPES[precision]).to(device).eval()


class TextEncoders:
    """`encode(prompts)` -> (prompt_embeds [B, 77+T, D], pooled [B, P]) in fp32, as encode_prompt does.

    CLIP: penultimate hidden states of L and G concatenated, zero-padded to T5's width; pooled =
    both projected text_embeds concatenated. T5: max-length padding, no attention mask; zeros of the
    same shape when T5 is not used (`t5_precision: none`).
    """

    def __init__(self, root: str, t5_precision: str, clip_dtype: torch.dtype, device: torch.device,
                 max_sequence_length: int):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()  # per-component "Loading weights" bars would bury our own

        self.device = device
        self.max_sequence_length = max_sequence_length
        self.tokenizers = [CLIPTokenizer.from_pretrained(component_dir(root, n)) for n in ("tokenizer", "tokenizer_2")]
        self.clips = [
            CLIPTextModelWithProjection.from_pretrained(component_dir(root, n), dtype=clip_dtype).to(device).eval()
            for n in ("text_encoder", "text_encoder_2")
        ]
        self.t5 = None
        if t5_precision != "none":
            self.t5_tokenizer = T5TokenizerFast.from_pretrained(component_dir(root, "tokenizer_3"))
            self.t5 = _load_t5(root, t5_precision, device)
            self.width = self.t5.config.d_model
        else:
            with open(os.path.join(component_dir(root, "transformer"), "config.json")) as f:
                self.width = json.load(f)["joint_attention_dim"]
        self.clip_tokens = self.tokenizers[0].model_max_length
        self.pooled_dim = sum(c.config.projection_dim for c in self.clips)

    def truncated(self, prompts: List[str]) -> List[tuple]:
        """Per prompt: (loses tokens to CLIP's 77, loses tokens to max_sequence_length)."""
        return [(len(self.tokenizers[0](p).input_ids) > self.clip_tokens,
                 self.t5 is not None and len(self.t5_tokenizer(p).input_ids) > self.max_sequence_length)
                for p in prompts]

    @torch.no_grad()
    def encode(self, prompts: List[str]):
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers, self.clips):
            ids = tok(prompts, padding="max_length", max_length=self.clip_tokens, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        if self.t5 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.width, device=self.device)
        else:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.t5(ids.to(self.device))[0].float()
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


class VaeEncoder:
    """The VAE's encoder half; returns the raw posterior mean and std (no shift/scale applied)."""

    def __init__(self, root: str, dtype: torch.dtype, device: torch.device, max_pixels: int = 1024 * 1024):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(component_dir(root, "vae"), torch_dtype=dtype)
        self.vae.decoder = None  # never used here; frees its memory
        self.vae.to(device).eval()
        self.device, self.dtype, self.max_pixels = device, dtype, max_pixels
        cfg = self.vae.config
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor if cfg.shift_factor is not None else 0.0
        self.latent_channels = cfg.latent_channels
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)

    def encode(self, pixels: torch.Tensor):
        """[N, 3, H, W] in [-1, 1] -> (mean, std), fp32; in calls of at most `max_pixels` pixels (vae.max_pixels)."""
        n, _, h, w = pixels.shape
        step = vae_batch(n, self.max_pixels, h, w)
        if step >= n:
            return self._encode(pixels)
        parts = [self._encode(pixels[i:i + step]) for i in range(0, n, step)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor):
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def numerics(device: torch.device, t5_precision: str) -> dict:
    """What decides the encoders' float results besides the config and the weights.

    Kernels are picked by device, library version and, on the CPU, by instruction set and thread count:
    oneDNN's 1x1 convolution in the tiny VAE gives other roundings with 1 and 2 threads (up to 2.3e-6 in
    fp32 latents, which moves bf16-stored values by one step, 2e-3). A shard is recorded with these
    settings, and a resume that would compute with others is refused (see precompute.run).
    """
    from importlib.metadata import PackageNotFoundError, version

    def ver(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    n = {"device": device.type, "torch": torch.__version__, "diffusers": ver("diffusers"),
         "transformers": ver("transformers"), "matmul_precision": torch.get_float32_matmul_precision()}
    if t5_precision in ("nf4", "int8"):
        n["bitsandbytes"] = ver("bitsandbytes")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        n.update(device_name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}", cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), cudnn_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        n.update(device_name=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                 threads=torch.get_num_threads())
    return n


def vae_batch(batch: int, max_pixels: int, height: int, width: int) -> int:
    """Images per VAE call: at most `batch`, at most `max_pixels` pixels, at least one image."""
    return max(1, min(batch, max_pixels // (height * width)))
