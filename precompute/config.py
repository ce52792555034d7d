"""Precompute config schema. YAML files in configs/ hold values; this holds names, types, defaults."""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from shards.config import check, check_ranges, one_of
from shards.modelpath import check_model_path

T5_PRECISIONS = ("nf4", "int8", "bf16", "fp16", "fp32", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Every extension PIL decodes as a picture (GIF: first frame; TIFF: first page; case is ignored).
IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
# Image files we see but do not read (PIL cannot, or gets no single right picture from them: layers,
# icons, raw sensor data); each is listed in rejected.jsonl, as is every file of an unknown type.
OTHER_IMAGE_EXTS = (".heic", ".heif", ".jxl", ".svg", ".ico", ".psd", ".raw", ".dng", ".cr2", ".nef", ".arw",
                    ".exr", ".hdr")


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
    "num_workers": "[0, inf)", "seed": "[0, 4294967295]", "part": "[0, inf)", "parts": "[1, inf)",
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
    device: str = "auto"  # auto: cuda if available, else cpu (cuda:LOCAL_RANK under torchrun)
    seed: int = 0
    part: int = 0  # this process's part of the inputs when `parts` > 1 (set from RANK under torchrun)
    parts: int = 1

    def __post_init__(self):
        p = []
        check_model_path("model.path", self.model.path, p)
        from .tars import is_webdataset

        if not self.data.path:
            p.append("config key 'data.path' is required (a folder of images and .txt captions, or webdataset tars)")
        elif not is_webdataset(self.data.path) and not os.path.isdir(self.data.path):
            p.append(f"config key 'data.path': no such folder: {self.data.path}")
        one_of(p, "data.caption_source", self.data.caption_source, ("file", "instance"))
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
        one_of(p, "buckets.crop", b.crop, ("center", "random"))
        one_of(p, "text.t5_precision", self.text.t5_precision, T5_PRECISIONS)
        one_of(p, "text.clip_precision", self.text.clip_precision, PRECISIONS)
        one_of(p, "vae.precision", self.vae.precision, PRECISIONS)
        if not self.out.dir:
            p.append("config key 'out.dir' is required")
        elif self.data.path and os.path.abspath(self.out.dir) == os.path.abspath(self.data.path):
            p.append("config keys 'out.dir' and 'data.path' name the same folder; write the shard set elsewhere")
        one_of(p, "out.dtype", self.out.dtype, ("bf16", "fp16", "fp32"))
        check_ranges(self, RANGES, p)
        if self.parts >= 1 and not 0 <= self.part < self.parts:
            p.append(f"config keys 'part'/'parts': need 0 <= part < parts, got part={self.part} parts={self.parts}")
        check(p)
