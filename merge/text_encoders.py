"""Text encoder LoRAs from kohya / sd-scripts files, folded into the text encoders a release carries.

sd-scripts names them `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5) followed by the module's
path in the transformers model with '.' -> '_' (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`,
`lora_te3_encoder_block_0_layer_0_SelfAttention_q`). Module paths hold underscores of their own, so a name is
resolved against the encoder's own tensor names, as sd-scripts builds it, never by guessing where dots were.

A release carries an encoder when it is a diffusers folder and the base has that component folder, or a
single file that bundles it (`out.include=[text_encoders]`, or a single-file base with `text_encoders.*`).
A component that gets a LoRA is written anew in the release (its weight files are not linked from the base);
the others are placed like any unchanged component. LoRAs of encoders the release does not carry are left
out with one warning line, unless nothing else is left to merge.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from shards.common.errors import DataError

from .fold import fold_model, modules_for
from .kohya import split_qkv_warning
from .lora import LoraModule, Updates, add_updates, read_lora_file
from .sources import TRANSFORMERS_WEIGHTS, FileSource, Source, file_keys, folder_source
from .verify import check_target


@dataclass(frozen=True)
class TextEncoder:
    component: str  # the pipeline's folder
    kohya: str  # sd-scripts' key prefix
    label: str
    single_file: str  # its prefix in an original single file (ComfyUI's names)


TEXT_ENCODERS = (TextEncoder("text_encoder", "lora_te1_", "CLIP-L", "text_encoders.clip_l.transformer."),
                 TextEncoder("text_encoder_2", "lora_te2_", "CLIP-G", "text_encoders.clip_g.transformer."),
                 TextEncoder("text_encoder_3", "lora_te3_", "T5", "text_encoders.t5xxl.transformer."))
BY_COMPONENT = {t.component: t for t in TEXT_ENCODERS}
BY_KOHYA = {t.kohya: t for t in TEXT_ENCODERS}
# Weight files of a model folder: what a component that gets a LoRA must not carry over from the base (a
# variant such as model.fp16.safetensors would load without the LoRA).
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


@dataclass(frozen=True)
class TextLora:
    path: str  # the LoRA file, for messages
    name: str  # kohya module name, e.g. lora_te1_text_model_encoder_layers_0_self_attn_q_proj
    module: LoraModule


TextLoras = Dict[str, List[TextLora]]  # component -> its LoRA modules, in lora.path order


@dataclass
class MergeLoras:
    """Every LoRA of a merge: the transformer's updates, the text encoders' modules, warnings to print."""
    updates: Updates
    text: TextLoras = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


def read_merge_loras(paths: Sequence[str], scales: Sequence[float]) -> MergeLoras:
    """read_loras plus the text encoder modules of kohya files and the split_qkv warning of each file."""
    out = MergeLoras({})
    for path, scale in zip(paths, scales):
        lora = read_lora_file(path, scale)
        add_updates(out.updates, lora.transformer)
        text = 0
        for prefix, modules in lora.text_encoders.items():
            text += len(modules)
            out.text.setdefault(BY_KOHYA[prefix].component, []).extend(
                TextLora(path, name, m) for name, m in modules.items())
        # q, k and v each count as a module of the transformer; the fused file had one module for the three.
        others = len(lora.transformer) - 3 * lora.fused_qkv + text
        line = split_qkv_warning(path, lora.header, lora.fused_qkv, others, scale)
        if line:
            out.warnings.append(line)
    out.updates = dict(sorted(out.updates.items()))
    out.text = {c: out.text[c] for c in BY_COMPONENT if c in out.text}
    return out


def resolve(component: str, loras: Sequence[TextLora], source: Source, prefix: str = "") -> Updates:
    """The encoder's updates by `source`'s module names (which start with `prefix`), shapes checked."""
    enc = BY_COMPONENT[component]
    modules: Dict[str, List[str]] = {}
    for n in source.names:
        if n.startswith(prefix) and n.endswith(".weight"):
            m = n[: -len(".weight")]
            modules.setdefault(m[len(prefix):].replace(".", "_"), []).append(m)
    updates: Updates = {}
    for t in loras:
        key = f"{t.name}.lora_down.weight"
        found = modules.get(t.name[len(enc.kohya):], [])
        if len(found) != 1:
            what = "no module" if not found else f"{len(found)} modules ({', '.join(found)})"
            raise DataError(f"{t.path}: '{key}' names {what} of the base's {enc.label} ({component}); "
                            "is the LoRA made for another text encoder?")
        target = found[0]
        shape = tuple(source.shape(target + ".weight"))
        if shape != t.module.shape:
            raise DataError(f"{t.path}: '{key}' and its lora_up make a {'x'.join(map(str, t.module.shape))} update "
                            f"but {enc.label}'s '{target[len(prefix):]}.weight' has shape {shape}")
        m = t.module
        updates.setdefault(target, []).append(LoraModule(target, m.down, m.up, m.scale))
    return updates


def describe(counts: Dict[str, int], word: str = "of") -> str:
    """'12 LoRA modules of CLIP-L (text_encoder), 8 of T5 (text_encoder_3)'."""
    parts = [f"{n} {word} {BY_COMPONENT[c].label} ({c})" for c, n in counts.items()]
    if parts:
        n = next(iter(counts.values()))
        parts[0] = parts[0].replace(f"{n} ", f"{n} LoRA module{'' if n == 1 else 's'} ", 1)
    return ", ".join(parts)


@dataclass(frozen=True)
class Check:
    """One folded encoder for merge.verify: its tensors in the base (those under `prefix`) and the release."""
    base: Source
    prefix: str
    release: Callable[[], Source]
    updates: Updates


@dataclass
class TextMerge:
    """What happened to the text encoder LoRAs of one merge."""
    merged: Dict[str, int] = field(default_factory=dict)  # component -> LoRA modules folded into it
    left_out: Dict[str, int] = field(default_factory=dict)  # component -> LoRA modules the release cannot take
    hint: str = ""  # how to include what was left out
    checks: List[Check] = field(default_factory=list)

    def warning(self) -> Optional[str]:
        if not self.left_out:
            return None
        return (f"merge: warning: the release does not carry every text encoder the LoRAs change: left out "
                f"{describe(self.left_out)} and merged the rest; {self.hint}")

    def summary(self) -> Optional[str]:
        return f"merge: folded {describe(self.merged, 'into')}" if self.merged else None

    def check_something_left(self, updates: Updates, lora_files: Sequence[str]) -> None:
        """Refuse a merge that would leave out every LoRA module: its release would equal the base."""
        if self.left_out and not updates and not self.merged:
            raise DataError(f"{', '.join(lora_files)}: the LoRAs change only text encoders, which the release does "
                            f"not carry ({describe(self.left_out)}); {self.hint}")


def bundled(text: TextLoras, sources: Dict[str, Source], te: TextMerge, release: Callable[[], Source]
            ) -> Dict[str, Updates]:
    """The updates of each encoder bundled from `sources` (component -> its tensors under the single file's
    names), by those names; records in `te` what is merged and left out, and how to check it."""
    out: Dict[str, Updates] = {}
    for component, loras in text.items():
        source = sources.get(component)
        if source is None:
            te.left_out[component] = len(loras)
            continue
        prefix = BY_COMPONENT[component].single_file
        out[component] = resolve(component, loras, source, prefix)
        te.merged[component] = len(loras)
        te.checks.append(Check(source, prefix, release, out[component]))
    return out


def is_weight_file(rel: str, components: Sequence[str]) -> bool:
    """Whether `rel` (a path in the base folder) is a weight file of one of `components`."""
    parts = rel.split(os.sep)
    return len(parts) == 2 and parts[0] in components and parts[1].endswith(WEIGHT_EXTENSIONS + (".index.json",))


@dataclass(frozen=True)
class FolderPlan:
    component: str
    source: Source  # the base encoder's weights
    updates: Updates


def plan_folders(model: str, text: TextLoras, te: TextMerge, open_source: Callable[[str, str], Source]
                 ) -> List[FolderPlan]:
    """Resolve each encoder's LoRAs against the base folder's weights before anything is written; encoders the
    base lacks (SD3 without T5) are recorded as left out. `open_source(folder, what)` opens a base encoder."""
    plans = []
    for component, loras in text.items():
        folder = os.path.join(model, component)
        if not os.path.isdir(folder):
            te.left_out[component] = len(loras)
            te.hint = f"model.path has no {component} folder to fold them into"
            continue
        source = open_source(folder, f"base {component}")
        plans.append(FolderPlan(component, source, resolve(component, loras, source)))
    return plans


def fold_folders(plans: Sequence[FolderPlan], out: str, te: TextMerge, max_shard_bytes: int, progress: bool) -> None:
    """Each planned encoder with its LoRAs folded, as a new copy of its weights under out/<component>."""
    for plan in plans:
        dest = os.path.join(out, plan.component)
        fold_model(plan.source, plan.updates, dest, "auto", max_shard_bytes, progress, TRANSFORMERS_WEIGHTS)
        te.merged[plan.component] = sum(map(len, plan.updates.values()))
        te.checks.append(Check(plan.source, "", lambda d=dest, c=plan.component: folder_source(
            d, f"release {c}", TRANSFORMERS_WEIGHTS), plan.updates))


def release_file_source(path: str) -> FileSource:
    """Every tensor of a single-file release under its own name."""
    return FileSource({n: path for n in file_keys(path, "release")}, "release")


def verify_text_encoders(te: TextMerge) -> Optional[str]:
    """merge.verify for the text encoders: every tensor of each folded encoder read back, LoRA targets against
    base + deltas up to rounding, everything else bit for bit. One line for the output; None without any."""
    if not te.checks:
        return None
    tensors = targets = 0
    worst, worst_name = 0.0, ""
    for check in te.checks:
        with check.release() as out:
            there = set(out.names)
            for name in (n for n in check.base.names if n.startswith(check.prefix)):
                if name not in there:
                    raise DataError(f"verify: the release has no '{name}' of the {check.base.what}")
                b, o = check.base.get(name), out.get(name)
                modules = modules_for(check.updates, name)
                tensors += 1
                if modules:
                    targets += 1
                    err = check_target(name, b, o, modules, "auto")
                    if err >= worst:
                        worst, worst_name = err, name
                elif o.dtype != b.dtype or not torch.equal(o, b):
                    raise DataError(f"verify: '{name}' of the {check.base.what} is no LoRA target but differs from "
                                    "the base; the release is wrong")
    return (f"verify: {tensors} text encoder tensors read back; {targets} LoRA targets match base + scale * B @ A "
            f"(worst relative error {worst:.2e}, in '{worst_name}'), every other tensor equals the base")
