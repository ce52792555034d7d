"""CLIP-L, CLIP-G, T5 and the VAE encoder, computing exactly what StableDiffusion3Pipeline computes."""
import json
import os
from typing import List, Optional

import torch

from shards.common.dtypes import STORAGE_DTYPES as _DTYPES
from shards.gpu_margins import GIB, MARGIN_ALLOCATOR, MARGIN_CONTEXT
from shards.common.hub import component_dir


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
    return T5EncoderModel.from_pretrained(path, dtype=_DTYPES[precision]).eval()  # placed by the caller


class Residency:
    """Where the encoders' weights are between uses.

    Not `idle`: each encoder stays on the device once there. `idle`: only the encoder running is on the
    device and the others wait in host memory, so the device holds the largest encoder and its activations
    instead of all of them (SD3's text encoders are 5.4 GiB with T5 in nf4, of which T5 is 3.9 GiB; the VAE
    encoder's activations are 2.5 GiB per 1024² image in fp32). Each switch copies one encoder out and the
    next in; precompute orders the work so that this happens a few times per group of images, not per batch.
    """

    def __init__(self, device: torch.device, idle: bool = False):
        self.device, self.idle = torch.device(device), idle
        self.on_device: Optional[torch.nn.Module] = None
        self.switches = 0

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Where a freshly loaded encoder goes: the host when idle encoders wait there, else the device."""
        _move(module, HOST if self.idle else self.device)
        return module

    def use(self, module: torch.nn.Module) -> None:
        if not self.idle or self.on_device is module:
            return
        if self.on_device is not None:
            _move(self.on_device, HOST)
        _move(module, self.device)
        self.on_device = module
        self.switches += 1

    def keep_all(self, modules) -> None:
        """Stop moving encoders: all of `modules` go to the device and stay."""
        self.idle, self.on_device = False, None
        for m in modules:
            _move(m, self.device)


HOST = torch.device("cpu")


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)
    # bitsandbytes' int8 layer refers to its weight twice: as the parameter's `CB` attribute until its first
    # forward, as its matmul state's `CB` after it. `Module.to` moves the parameter's data only (its `CB` and
    # `SCB` attributes keep the old tensors) and the state apart from it, so after a move there would be two
    # copies of the weight, one of them on the old device: point both at the moved data again.
    for m in module.modules():
        weight, state = getattr(m, "weight", None), getattr(m, "state", None)
        if getattr(weight, "CB", None) is not None and weight.CB.shape == weight.data.shape:
            weight.CB = weight.data
            if getattr(weight, "SCB", None) is not None:
                weight.SCB = weight.SCB.to(device)
        if getattr(state, "CB", None) is not None and weight is not None and weight.data.shape == state.CB.shape:
            state.CB = weight.data


def encoders_fit(weights: int, vae_activations: int, total: int) -> bool:
    """Whether every encoder can stay on a device of `total` bytes: their `weights` and the VAE encoder's
    activations of one call, with the margins of the memory models (allocator, CUDA context) and 0.5 GiB for
    the text encoders' activations."""
    return (weights + vae_activations) * (1 + MARGIN_ALLOCATOR) + MARGIN_CONTEXT + 0.5 * GIB <= total


# The VAE encoder's peak activations per pixel of one call, fp32 (modelled at SD3's VAE: 2,572 MiB for a
# 1024² image, see bench.precompute_memory; a test checks this bound against the model).
VAE_ACTIVATION_BYTES_PER_PIXEL_FP32 = 2600


def vae_activation_bytes(pixels: int, dtype: torch.dtype) -> int:
    return int(pixels * VAE_ACTIVATION_BYTES_PER_PIXEL_FP32 * torch.finfo(dtype).bits / 32)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in list(module.parameters()) + list(module.buffers()))


class TextEncoders:
    """`encode(prompts)` -> (prompt_embeds [B, 77+T, D], pooled [B, P]) in fp32, as encode_prompt does.

    CLIP: penultimate hidden states of L and G concatenated, zero-padded to T5's width; pooled =
    both projected text_embeds concatenated. T5: max-length padding, no attention mask; zeros of the
    same shape when T5 is not used (`t5_precision: none`).
    """

    def __init__(self, tokenizers, clips, t5_tokenizer, t5, width: int, max_sequence_length: int,
                 device: torch.device, residency: Optional[Residency] = None):
        self.tokenizers, self.clips, self.t5_tokenizer, self.t5 = tokenizers, clips, t5_tokenizer, t5
        self.width, self.max_sequence_length, self.device = width, max_sequence_length, device
        self.residency = residency or Residency(device)
        self.clip_tokens = self.tokenizers[0].model_max_length
        self.pooled_dim = sum(c.config.projection_dim for c in self.clips)

    @classmethod
    def load(cls, root: str, t5_precision: str, clip_dtype: torch.dtype, device: torch.device,
             max_sequence_length: int, residency: Optional[Residency] = None) -> "TextEncoders":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()  # per-component "Loading weights" bars would bury our own
        residency = residency or Residency(device)
        tokenizers = [CLIPTokenizer.from_pretrained(component_dir(root, n)) for n in ("tokenizer", "tokenizer_2")]
        clips = [residency.place(CLIPTextModelWithProjection.from_pretrained(component_dir(root, n),
                                                                             dtype=clip_dtype).eval())
                 for n in ("text_encoder", "text_encoder_2")]
        t5_tokenizer = t5 = None
        if t5_precision != "none":
            t5_tokenizer = T5TokenizerFast.from_pretrained(component_dir(root, "tokenizer_3"))
            t5 = residency.place(_load_t5(root, t5_precision, device))
            width = t5.config.d_model
        else:
            with open(os.path.join(component_dir(root, "transformer"), "config.json")) as f:
                width = json.load(f)["joint_attention_dim"]
        return cls(tokenizers, clips, t5_tokenizer, t5, width, max_sequence_length, device, residency)

    @property
    def modules(self) -> list:
        return [*self.clips, *([self.t5] if self.t5 is not None else [])]

    def truncated(self, prompts: List[str]) -> List[tuple]:
        """Per prompt: (loses tokens to CLIP's 77, loses tokens to max_sequence_length)."""
        return [(len(self.tokenizers[0](p).input_ids) > self.clip_tokens,
                 self.t5 is not None and len(self.t5_tokenizer(p).input_ids) > self.max_sequence_length)
                for p in prompts]

    def encode(self, prompts: List[str]):
        return self.encode_batches([prompts], on_host=False)[0]

    @torch.no_grad()
    def encode_batches(self, batches: List[List[str]], on_host: bool = True) -> List[tuple]:
        """`encode` of each batch of prompts, each encoder over all batches before the next (one switch per
        encoder when idle encoders wait on the host). `on_host`: results copied to the host as they come, so a
        group's embeddings do not accumulate on the device."""
        out = (lambda t: t.float().cpu()) if on_host else (lambda t: t.float())
        hidden, pooled = [[] for _ in batches], [[] for _ in batches]
        for tok, enc in zip(self.tokenizers, self.clips):
            self.residency.use(enc)
            for k, prompts in enumerate(batches):
                ids = tok(prompts, padding="max_length", max_length=self.clip_tokens, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                result = enc(ids, output_hidden_states=True)
                hidden[k].append(out(result.hidden_states[-2]))
                pooled[k].append(out(result[0]))
        if self.t5 is None:
            device = HOST if on_host else self.device
            t5 = [torch.zeros(len(p), self.max_sequence_length, self.width, device=device) for p in batches]
        else:
            self.residency.use(self.t5)
            t5 = [out(self.t5(self.t5_tokenizer(p, padding="max_length", max_length=self.max_sequence_length,
                                                  truncation=True, add_special_tokens=True,
                                                  return_tensors="pt").input_ids.to(self.device))[0])
                  for p in batches]
        results = []
        for h, p, t in zip(hidden, pooled, t5):
            clip = torch.cat(h, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
            results.append((torch.cat([clip, t], dim=-2), torch.cat(p, dim=-1)))
        return results


class VaeEncoder:
    """The VAE's encoder half; returns the raw posterior mean and std (no shift/scale applied)."""

    def __init__(self, vae, dtype: torch.dtype, device: torch.device, max_pixels: int = 1024 * 1024,
                 residency: Optional[Residency] = None):
        self.vae, self.device, self.dtype, self.max_pixels = vae, device, dtype, max_pixels
        self.residency = residency or Residency(device)
        cfg = self.vae.config
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor if cfg.shift_factor is not None else 0.0
        self.latent_channels = cfg.latent_channels
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def load(cls, root: str, dtype: torch.dtype, device: torch.device, max_pixels: int = 1024 * 1024,
             residency: Optional[Residency] = None) -> "VaeEncoder":
        from diffusers import AutoencoderKL

        residency = residency or Residency(device)
        vae = AutoencoderKL.from_pretrained(component_dir(root, "vae"), torch_dtype=dtype)
        vae.decoder = None  # never used here; frees its memory
        return cls(residency.place(vae.eval()), dtype, device, max_pixels, residency)

    def encode(self, pixels: torch.Tensor):
        """[N, 3, H, W] in [-1, 1] -> (mean, std), fp32; in calls of at most `max_pixels` pixels (vae.max_pixels)."""
        n, _, h, w = pixels.shape
        step = vae_batch(n, self.max_pixels, h, w)
        self.residency.use(self.vae)
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
