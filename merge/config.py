"""The merge stage's schema: which base, which LoRA, where the release goes."""
import math
from dataclasses import dataclass, field
from typing import List

from shards.config import check, one_of

DTYPES = ("auto", "bf16", "fp16", "fp32")
LINKS = ("hardlink", "copy")


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

    def problems(self) -> List[str]:
        p = [] if self.dir else ["config key 'out.dir' is required"]
        one_of(p, "out.dtype", self.dtype, DTYPES)
        one_of(p, "out.link", self.link, LINKS)
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
