"""Precompute config schema. YAML files in configs/ hold values; this holds names, types, defaults."""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from shards.common.config import check, check_choices, check_ranges
from shards.common.hub import check_model_path

from .inputs import is_webdataset

T5_PRECISIONS = ("nf4", "int8", "bf16", "fp16", "fp32", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
@dataclass
class ModelConfig:
    path: str = ""  # diffusers SD3 pipeline folder or hub id
    revision: Optional[str] = None


@dataclass
class DataConfig:
    path: str = ""  # folder of images with same-stem .txt captions (searched recursively)
    caption_source: str = "file"  # file: the .txt caption (instance_prompt if it is missing); instance: always instance_prompt
    instance_prompt: Optional[str] = None
    caption_ext: str = ".txt"
    caption_column: str = "text"  # caption column of a metadata.jsonl / metadata.csv (with file_name)
    caption_prefix: str = ""  # put before every instance caption (not class images) with a space, e.g. "sks,"
    class_path: str = ""  # DreamBooth class (regularisation) images, all captioned with class_prompt
    class_prompt: Optional[str] = None


@dataclass
class BucketConfig:
    resolution: int = 1024  # target area = resolution²
    step: int = 64  # bucket sides are multiples of this (and of 16 = VAE factor × patch size)
    min_aspect: float = 0.5  # height/width limits of the buckets
    max_aspect: float = 2.0
    min_size: int = 512  # images whose shorter side is below this are rejected...
    upscale: bool = False  # ...unless this is true (then they are upscaled into their bucket)
    crop: str = "center"  # center | random (seeded per image: the same image always gets the same crop)


@dataclass
class AugmentConfig:
    flip: bool = False  # also store the latent of the horizontally flipped image (latent_mean_flip/std_flip)


@dataclass
class TextConfig:
    t5_precision: str = "nf4"
    clip_precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    max_sequence_length: int = 77  # T5 tokens


@dataclass
class VaeConfig:
    precision: str = "fp32"  # the SD3 VAE overflows in fp16 on some images
    # Pixels per VAE call (images × height × width): the encoder's activations grow with it (about 2.5 GB per
    # 1024² image in fp32, measured), so 1024² images go one at a time and 512² four at a time.
    max_pixels: int = 1024 * 1024


@dataclass
class OutConfig:
    dir: str = ""
    dtype: str = "bf16"  # storage dtype of latents and embeddings
    # Store the VAE posterior's std beside its mean (training samples each latent from both). Without it the
    # trainer uses the mean (no sampling noise on the latent); a 1024² sample is 0.5 MB smaller (1 MB with flip).
    latent_std: bool = True
    samples_per_shard: int = 1000
    overwrite: bool = False


@dataclass
class ValidationConfig:
    prompts: List[str] = field(default_factory=list)


# The values each numeric key can take (a test checks that every numeric key of the schema is here).
RANGES = {
    "buckets.resolution": "[16, inf)", "buckets.step": "[16, inf)", "buckets.min_aspect": "(0, 1]",
    "buckets.max_aspect": "[1, inf)", "buckets.min_size": "[0, inf)", "text.max_sequence_length": "[1, 512]",
    "vae.max_pixels": "[1, inf)", "out.samples_per_shard": "[1, inf)", "batch_size": "[1, inf)",
    "num_workers": "[0, inf)", "offload_group": "[1, inf)", "seed": "[0, 4294967295]", "part": "[0, inf)", "parts": "[1, inf)",
}

CHOICES = {
    "data.caption_source": ("file", "instance"), "buckets.crop": ("center", "random"),
    "text.t5_precision": T5_PRECISIONS, "text.clip_precision": PRECISIONS, "vae.precision": PRECISIONS,
    "out.dtype": ("bf16", "fp16", "fp32"), "offload": ("auto", "idle", "none"),
}
REQUIRED = ("model.path", "data.path", "out.dir")
# What each key means, as `--help` prints it (a test checks that every key has one, and that README.md's
# tables name the same keys with the same defaults).
HELP = {
    "model.path": "diffusers SD3 folder or hub id",
    "model.revision": "hub revision",
    "data.path": "image folder, or webdataset tars (path, brace pattern, URL, pipe:)",
    "data.caption_source": "file: the caption from .txt / metadata / tar (else data.instance_prompt); instance: "
                           "always data.instance_prompt",
    "data.instance_prompt": "caption for images without one (DreamBooth-style)",
    "data.caption_ext": "caption file extension",
    "data.caption_column": "caption field of metadata.jsonl / metadata.csv / a tar's .json",
    "data.caption_prefix": "put before every instance caption with a space, e.g. a trigger word sks, (never on "
                           "class images)",
    "data.class_path": "DreamBooth class (prior-preservation) images",
    "data.class_prompt": "caption of every class image (required with data.class_path)",
    "buckets.resolution": "target area = resolution² pixels",
    "buckets.step": "bucket sides are multiples of this (a multiple of 16)",
    "buckets.min_aspect": "smallest height/width ratio of the buckets",
    "buckets.max_aspect": "largest height/width ratio of the buckets",
    "buckets.min_size": "images whose shorter side is smaller are rejected...",
    "buckets.upscale": "...unless this is true (then they are upscaled)",
    "buckets.crop": "center or random (seeded per image: the same image always gets the same crop)",
    "augment.flip": "also store the latent of the horizontally flipped image (latent_mean_flip, "
                    "latent_std_flip)",
    "text.t5_precision": "T5 weights: nf4 (bitsandbytes 4-bit), int8, bf16, fp16, fp32, or none (zero T5 "
                         "embeddings, as SD3 allows)",
    "text.clip_precision": "auto (fp16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
    "text.max_sequence_length": "T5 tokens (the pipeline uses 256, at most 512)",
    "vae.precision": "VAE encoder precision (auto, bf16, fp16, fp32)",
    "vae.max_pixels": "pixels per VAE call (images × height × width, at least one image): bounds the encoder's "
                      "activation memory, about 2.5 GB per 1024² image in fp32 (BENCHMARKS.md)",
    "out.dir": "shard set folder",
    "out.dtype": "storage dtype of latents and embeddings (bf16, fp16, fp32)",
    "out.samples_per_shard": "inputs per tar shard (folder inputs)",
    "out.latent_std": "store the VAE posterior's std beside its mean; false: training uses the mean (no sampling "
                      "noise on the latent), a 1024² sample is 0.5 MB smaller (1 MB with flip)",
    "out.overwrite": "rebuild a set made with other settings, or redo the shards of changed images",
    "validation.prompts": "prompts whose embeddings go into extras.safetensors for validation images",
    "batch_size": "images per encoder batch (part of the set's identity: batched arithmetic rounds differently)",
    "num_workers": "processes decoding and resizing images",
    "offload": "idle: only the encoder running is on the GPU, the others wait in host memory (fits SD3's "
               "encoders in 4 GiB with T5 in nf4: 8 GB cards); none: all stay on the GPU (fastest); auto: idle "
               "when all of them and the VAE's activations would not fit the GPU",
    "offload_group": "images encoded between two rounds of encoder switches under offload idle (their latents "
                     "wait in host memory: 4 MB each at 1024² with augment.flip)",
    "device": "cuda if available, else cpu; or cpu, cuda, cuda:N",
    "seed": "random crops",
    "part": "this process's share of the shards: its index",
    "parts": "this process's share of the shards: how many shares",
}


@dataclass
class PrecomputeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    out: OutConfig = field(default_factory=OutConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 4
    num_workers: int = 2  # processes decoding and resizing images while the encoders run
    # auto: idle when the encoders together with the VAE's activations would not fit the GPU; idle: only the
    # encoder running is on the GPU, the others wait in host memory; none: all stay on the GPU.
    offload: str = "auto"
    offload_group: int = 256  # images encoded between two rounds of encoder switches when offloading
    device: str = "auto"  # auto: cuda if available, else cpu (cuda:LOCAL_RANK under torchrun)
    seed: int = 0
    part: int = 0  # this process's part of the inputs when `parts` > 1 (set from RANK under torchrun)
    parts: int = 1

    def __post_init__(self):
        p = []
        check_model_path("model.path", self.model.path, p)
        if not self.data.path:
            p.append("config key 'data.path' is required (a folder of images and .txt captions, or webdataset tars)")
        elif not is_webdataset(self.data.path) and not os.path.isdir(self.data.path):
            p.append(f"config key 'data.path': no such folder: {self.data.path}")
        if self.data.class_path and not os.path.isdir(self.data.class_path):
            p.append(f"config key 'data.class_path': no such folder: {self.data.class_path}")
        if self.data.class_path and not self.data.class_prompt:
            p.append("config key 'data.class_prompt' is required with data.class_path")
        if self.data.caption_source == "instance" and not self.data.instance_prompt:
            p.append("config key 'data.instance_prompt' is required when data.caption_source is 'instance'")
        b = self.buckets
        if b.step <= 0 or b.step % 16:
            p.append(f"config key 'buckets.step': {b.step} is not a positive multiple of 16 (VAE factor 8 × patch 2)")
        elif b.resolution < b.step:
            p.append(f"config key 'buckets.resolution': {b.resolution} is smaller than buckets.step {b.step}")
        if not self.out.dir:
            p.append("config key 'out.dir' is required")
        elif self.data.path and os.path.abspath(self.out.dir) == os.path.abspath(self.data.path):
            p.append("config keys 'out.dir' and 'data.path' name the same folder; write the shard set elsewhere")
        check_choices(self, CHOICES, p)
        check_ranges(self, RANGES, p)
        if self.parts >= 1 and not 0 <= self.part < self.parts:
            p.append(f"config keys 'part'/'parts': need 0 <= part < parts, got part={self.part} parts={self.parts}")
        check(p)
