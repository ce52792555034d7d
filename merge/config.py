"""The merge stage's schema: which base, which LoRA, where the release goes."""
import math
import os
from dataclasses import dataclass, field
from typing import Any, List

from shards.common.config import check, check_choices, check_ranges

DTYPES = ("auto", "bf16", "fp16", "fp32")
LINKS = ("auto", "copy", "reflink", "hardlink")
FORMATS = ("auto", "diffusers", "single_file")
INCLUDES = ("vae", "text_encoders")


def is_single_file(path: str) -> bool:
    """Whether model.path names an original single-file checkpoint rather than a pipeline folder or hub id."""
    return path.endswith(".safetensors")


@dataclass
class ModelConfig:
    # A local diffusers SD3 pipeline folder, a Hugging Face hub id, or a local original single-file checkpoint
    # (.safetensors with model.diffusion_model.*, and maybe first_stage_model.* and text_encoders.*).
    path: str = ""

    def problems(self) -> List[str]:
        return [] if self.path else ["config key 'model.path' is required"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LoraConfig:
    # A .safetensors file or a folder holding pytorch_lora_weights.safetensors; or a list of them,
    # folded in the order given (diffusers/peft and kohya files may be mixed).
    path: Any = ""
    # One scale for every LoRA, or a list with one scale per lora.path entry.
    scale: Any = 1.0

    def paths(self) -> List[str]:
        if not self.given():
            return []
        return [self.path] if isinstance(self.path, str) else [str(p) for p in self.path]

    def scales(self) -> List[float]:
        if isinstance(self.scale, (list, tuple)):
            return [float(v) for v in self.scale]
        return [float(self.scale)] * len(self.paths())

    def given(self) -> bool:
        return self.path not in (None, "", [], ())

    def problems(self) -> List[str]:
        p = []
        if not isinstance(self.path, (str, list, tuple)) or any(not isinstance(x, str) for x in
                                                                  ([] if isinstance(self.path, str) else self.path)):
            return ["config key 'lora.path' takes a file or folder, or a list of them: write lora.path=[a,b]"]
        paths = self.paths()
        if not paths or any(not x for x in paths):
            p.append("config key 'lora.path' is required" if not paths or paths == [""] else
                     "config key 'lora.path' has an empty entry")
        values = self.scale if isinstance(self.scale, (list, tuple)) else [self.scale]
        if any(not _is_number(v) for v in values) or not values:
            p.append(f"config key 'lora.scale': {self.scale} is not a finite number (or a list of them)")
        elif isinstance(self.scale, (list, tuple)) and len(values) != len(paths):
            p.append(f"config key 'lora.scale' has {len(values)} values for {len(paths)} lora.path entries; "
                     "give one scale per LoRA, or a single number for all")
        return p


@dataclass
class TransformerConfig:
    # A transformer trained in full (train.mode=full): its diffusers folder, or the training run's out.dir
    # holding it as transformer/. It takes the place of the base's transformer in the release.
    path: str = ""

    def folder(self) -> str:
        """The model folder itself: a training out.dir's transformer/ where the path names the run."""
        inner = os.path.join(self.path, "transformer")
        if not os.path.exists(os.path.join(self.path, "config.json")) and os.path.isdir(inner):
            return inner
        return self.path

    def problems(self) -> List[str]:
        if self.path and not os.path.exists(os.path.join(self.folder(), "config.json")):
            return [f"config key 'transformer.path': {self.path} is not a transformer folder (no config.json) nor "
                    "a training out.dir holding transformer/"]
        return []


@dataclass
class MergeOptions:
    # Read the release back after writing it and check every tensor against base + scale * B @ A * alpha / rank.
    verify: bool = False
    # ... and, for transformers with at most this many parameters, compare merged and unmerged forward passes.
    probe_max_params: int = 500_000_000


@dataclass
class OutConfig:
    dir: str = ""
    dtype: str = "auto"  # auto keeps each base tensor's dtype
    # How unchanged components get into a diffusers release. auto: copy-on-write reflinks where the filesystem
    # has them, else copies, with hard links only for large weight files; copy: full copies; reflink: reflinks or
    # an error; hardlink: hard links (copies across filesystems), which share the base's files: an edit in place
    # changes the base too.
    link: str = "auto"
    overwrite: bool = False
    # diffusers' own default unit: 5 GB in decimal bytes.
    max_shard_bytes: int = 5_000_000_000
    # diffusers: a complete pipeline folder; single_file: out.dir/<out.name>.safetensors in the original SD3
    # layout (model.diffusion_model.*, fused qkv); auto: the base's own layout.
    format: str = "auto"
    name: str = "model"  # the single file's name, without .safetensors (out.format=single_file only)
    # Components of a diffusers base bundled into the single file besides the transformer: vae
    # (first_stage_model.*), text_encoders (text_encoders.clip_l / clip_g / t5xxl.transformer.*).
    # A single-file base always keeps whatever it bundles.
    include: List[str] = field(default_factory=list)

    def problems(self) -> List[str]:
        p = [] if self.dir else ["config key 'out.dir' is required"]
        if (not self.name or self.name in (".", "..") or "/" in self.name or os.sep in self.name
                or self.name.startswith(".")):
            p.append(f"config key 'out.name': '{self.name}' is not a plain file name (no folders, not hidden)")
        if self.include and self.format == "diffusers":
            p.append("config key 'out.include' needs out.format=single_file (the diffusers format holds every component)")
        return p


# The values each numeric key can take (a test checks that every numeric key of the schema is here;
# lora.scale, a number or a list of them, is checked by LoraConfig).
RANGES = {"out.max_shard_bytes": "[1, inf)", "merge.probe_max_params": "[0, inf)"}

CHOICES = {"out.dtype": DTYPES, "out.link": LINKS, "out.format": FORMATS, "out.include": INCLUDES}
REQUIRED = ("model.path", "out.dir")
# What each key means, as `--help` prints it (a test checks that every key has one, and that README.md's
# tables name the same keys with the same defaults).
HELP = {
    "model.path": "base: diffusers SD3 folder, hub id, or a local original single-file .safetensors",
    "lora.path": "a LoRA .safetensors file (diffusers or kohya format) or a folder holding "
                 "pytorch_lora_weights.safetensors; or a list of them (required unless transformer.path is given)",
    "transformer.path": "a fully fine-tuned transformer (train.mode=full): its folder, or the training out.dir "
                        "holding transformer/; it replaces the base's transformer, and LoRAs in lora.path fold "
                        "into it",
    "lora.scale": "strength of the LoRA: one number for all, or a list with one per lora.path",
    "out.dir": "release folder",
    "out.dtype": "merged transformer's dtype: auto (the base's), bf16, fp16, fp32",
    "out.link": "how a diffusers release gets the base's unchanged files (the summary line counts each way): "
                "auto: a copy-on-write reflink where the filesystem has them (btrfs, XFS, ...), else a copy for "
                "files under 64 MiB and a hard link for larger ones (weights); copy: full copies; reflink: "
                "reflinks or an error; hardlink: hard links (copies across filesystems). A hard link *is* the "
                "base's file: editing it in place in the release edits the base too (auto risks this only for "
                "large weight files on filesystems without reflinks; use copy to rule it out)",
    "out.overwrite": "replace an earlier release in out.dir (a folder of other files is never deleted)",
    "out.format": "diffusers, single_file, or auto: the base's own layout",
    "out.name": "file name of a single_file release (OUT.DIR/NAME.safetensors)",
    "out.include": "single_file from a diffusers base: vae, text_encoders to bundle besides the transformer",
    "out.max_shard_bytes": "largest transformer shard of a diffusers release",
    "merge.verify": "before publishing, read the release back: every tensor against base + LoRA deltas, and a forward probe",
    "merge.probe_max_params": "largest transformer the forward probe loads (twice, in fp32)",
}


@dataclass
class MergeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    out: OutConfig = field(default_factory=OutConfig)
    merge: MergeOptions = field(default_factory=MergeOptions)

    def __post_init__(self):
        # Validated here rather than per section so one run reports every problem at once.
        loras = self.lora.problems() if self.lora.given() or not self.transformer.path else []
        if not self.lora.given() and not self.transformer.path:
            loras = ["config key 'lora.path' is required (or transformer.path, a fully fine-tuned transformer)"]
        p = self.model.problems() + loras + self.transformer.problems() + self.out.problems()
        check_choices(self, CHOICES, p)
        check_ranges(self, RANGES, p)
        if is_single_file(self.model.path):
            if self.out.format == "diffusers":
                p.append("config key 'out.format': a single-file base gives a single-file release (out.format="
                         "single_file or auto); for a diffusers folder, merge into the diffusers base instead")
            if self.out.include:
                p.append("config key 'out.include': a single-file base keeps everything it bundles; out.include "
                         "is for diffusers bases")
        elif self.out.include and self.out.format == "auto":
            p.append("config key 'out.include' needs out.format=single_file (a diffusers base gives a diffusers "
                     "release, which holds every component)")
        check(p)

    def release_format(self) -> str:
        """out.format with auto resolved: the base's own layout."""
        if self.out.format != "auto":
            return self.out.format
        return "single_file" if is_single_file(self.model.path) else "diffusers"
