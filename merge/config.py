"""The merge stage's schema: which base, which LoRA, where the release goes."""
import math
import os
from dataclasses import dataclass, field
from typing import List

from shards.config import check, one_of

DTYPES = ("auto", "bf16", "fp16", "fp32")
LINKS = ("hardlink", "copy")
FORMATS = ("diffusers", "single_file")
INCLUDES = ("vae",)


@dataclass
class ModelConfig:
    # A local diffusers SD3 pipeline folder, or a Hugging Face hub id.
    path: str = ""

    def problems(self) -> List[str]:
        return [] if self.path else ["config key 'model.path' is required"]


@dataclass
class LoraConfig:
    # A .safetensors file, or a folder holding pytorch_lora_weights.safetensors.
    path: str = ""
    scale: float = 1.0

    def problems(self) -> List[str]:
        p = [] if self.path else ["config key 'lora.path' is required"]
        if not math.isfinite(self.scale):
            p.append(f"config key 'lora.scale': {self.scale} is not a finite number")
        return p


@dataclass
class OutConfig:
    dir: str = ""
    dtype: str = "auto"  # auto keeps each base tensor's dtype
    link: str = "hardlink"  # how unchanged components get into the release
    overwrite: bool = False
    # diffusers' own default unit: 5 GB in decimal bytes.
    max_shard_bytes: int = 5_000_000_000
    # diffusers: a complete pipeline folder; single_file: only the transformer, as out.dir/<out.name>.safetensors
    # in the original SD3 checkpoint layout (model.diffusion_model.*, fused qkv).
    format: str = "diffusers"
    name: str = "model"  # the single file's name, without .safetensors (out.format=single_file only)
    # Other components put into the single file besides the transformer: [vae] adds first_stage_model.*.
    include: List[str] = field(default_factory=list)

    def problems(self) -> List[str]:
        p = [] if self.dir else ["config key 'out.dir' is required"]
        one_of(p, "out.dtype", self.dtype, DTYPES)
        one_of(p, "out.link", self.link, LINKS)
        one_of(p, "out.format", self.format, FORMATS)
        if (not self.name or self.name in (".", "..") or "/" in self.name or os.sep in self.name
                or self.name.startswith(".")):
            p.append(f"config key 'out.name': '{self.name}' is not a plain file name (no folders, not hidden)")
        for item in self.include:
            one_of(p, "out.include", item, INCLUDES)
        if self.include and self.format != "single_file":
            p.append("config key 'out.include' needs out.format=single_file (the diffusers format holds every component)")
        if self.max_shard_bytes <= 0:
            p.append(f"config key 'out.max_shard_bytes': {self.max_shard_bytes} must be positive")
        return p


@dataclass
class MergeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    out: OutConfig = field(default_factory=OutConfig)

    def __post_init__(self):
        # Validated here rather than per section so one run reports every problem at once.
        check(self.model.problems() + self.lora.problems() + self.out.problems())
