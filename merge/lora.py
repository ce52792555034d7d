"""Reading an SD3 LoRA file (diffusers/peft, or kohya via merge/kohya.py): modules, ranks, scales.

`read_lora` / `read_loras` give the transformer's modules; `read_lora_file` also gives the text encoder
modules a kohya file holds (merge/text_encoders.py folds those)."""
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from shards.common.errors import DataError, UsageError

from .kohya import is_kohya, kohya_file
from .lora_module import TEXT_ENCODER_PREFIXES, LoraModule, checked_pair, key_error

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"
# peft's LoraConfig defaults; diffusers builds a LoraConfig from the metadata, so missing fields get these.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
# peft.save_pretrained and diffusers' pipeline save add these in front of the transformer's module names.
KEY_PREFIXES = ("transformer.", "base_model.model.")
OTHER_COMPONENTS = TEXT_ENCODER_PREFIXES + ("lora_unet_",)  # kohya's transformer keys use original SD3 names


# Module name -> the LoRA modules that update it, in the order of lora.path (one per LoRA that has it).
Updates = Dict[str, List[LoraModule]]


def find_lora_file(path: str) -> str:
    if os.path.isdir(path):
        f = os.path.join(path, LORA_FILE_NAME)
        if not os.path.isfile(f):
            raise UsageError(f"lora.path '{path}' is a folder without {LORA_FILE_NAME}")
        return f
    if not os.path.isfile(path):
        raise UsageError(f"lora.path '{path}' does not exist")
    if not path.endswith(".safetensors"):
        raise UsageError(f"lora.path '{path}' is not a .safetensors file")
    return path


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """'transformer.a.b.lora_A.weight' -> ('a.b', 'A'); None for anything but a transformer LoRA A/B weight."""
    if key.startswith(OTHER_COMPONENTS):
        return None
    name = key
    for prefix in KEY_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], part
    return None


def adapter_config(header: Optional[Dict[str, str]], path: str) -> Optional[dict]:
    """The transformer's peft LoraConfig fields from the file header, None when the file has none."""
    raw = (header or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{path}: header entry '{METADATA_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: header entry '{METADATA_KEY}' is not a JSON object")
    # Pipeline-level saves prefix every field with the component; a model's save_lora_adapter does not.
    prefixed = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return prefixed or meta


def _pattern_value(patterns, module: str, default):
    """peft's rank_pattern / alpha_pattern rule: the first key that matches a dotted suffix of the name wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: Optional[dict], module: str, rank: int, scale: float, path: str = "") -> float:
    """lora.scale * alpha / rank (alpha / sqrt(rank) with rsLoRA), with alpha as diffusers would load it."""
    if config is None:
        return scale  # diffusers loads a LoRA without metadata with alpha = rank
    try:
        declared = _pattern_value(config.get("rank_pattern"), module, config.get("r", PEFT_DEFAULT_R))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    except re.error as e:
        raise DataError(f"{path}: adapter metadata has an invalid module pattern ({e})") from None
    if declared != rank:
        raise DataError(f"{path}: module '{module}' has rank {rank} but the adapter metadata says {declared}; "
                        "diffusers could not load this LoRA either")
    divisor = math.sqrt(rank) if config.get("use_rslora") else rank
    return scale * float(alpha) / divisor


@dataclass
class LoraFile:
    """What one LoRA file holds, each module with its final scale."""
    path: str
    header: Dict[str, str]
    transformer: Dict[str, LoraModule]  # by diffusers module name
    # kohya text encoder modules: sd-scripts' prefix (lora_te1_ ...) -> kohya module name -> module. Their
    # names are the encoder's module paths with '.' -> '_', so they are resolved against the encoder's tensors.
    text_encoders: Dict[str, Dict[str, LoraModule]] = field(default_factory=dict)
    fused_qkv: int = 0  # kohya fused qkv modules (sd-scripts' split_qkv alpha applies to these)


def read_lora_file(path: str, scale: float = 1.0) -> LoraFile:
    """Every LoRA module of a .safetensors file: the transformer's and, in kohya files, the text encoders'."""
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read LoRA file {path}: {e}") from None
    if not tensors:
        raise DataError(f"{path}: the LoRA file holds no tensors")
    if is_kohya(tensors):  # kohya files carry their alphas as tensors; the header plays no part
        transformer, text, fused = kohya_file(tensors, path, scale)
        return LoraFile(path, header, transformer, text, fused)
    parts: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        split = split_key(key)
        if split is None:
            raise key_error(path, key)
        module, part = split
        seen = parts.setdefault(module, {})
        if part in seen:  # the same module under two prefixes would be folded twice
            raise DataError(f"{path}: module '{module}' appears twice, as '{seen[part][0]}' and '{key}'")
        seen[part] = (key, tensors[key])

    config = adapter_config(header, path)
    modules = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise DataError(f"{path}: module '{name}' has no {missing} weight")
        down, up = checked_pair(path, name, ab["A"][1], ab["B"][1])
        modules[name] = LoraModule(name, down, up, module_scale(config, name, down.shape[0], scale, path))
    return LoraFile(path, header, modules)


def read_lora(path: str, scale: float = 1.0) -> Dict[str, LoraModule]:
    """Every transformer LoRA module in a .safetensors file, by module name, with its final scale.

    For the converter and other transformer-only readers: a file with text encoder modules is refused rather
    than read without them."""
    lora = read_lora_file(path, scale)
    text = [name for modules in lora.text_encoders.values() for name in modules]
    if text:
        raise DataError(f"{path}: '{text[0]}.lora_down.weight' is a text encoder LoRA weight; only the merge "
                        "itself folds those (this reads transformer LoRAs only)")
    return lora.transformer


def conv_modules(updates: Updates) -> List[str]:
    """The modules with a conv LoRA (merge.verify's forward probe applies linear LoRAs only)."""
    return [name for name, modules in updates.items() if any(m.conv for m in modules)]


def add_updates(updates: Updates, modules: Dict[str, LoraModule]) -> None:
    """Append each module to the updates of the weight it changes (after those of earlier LoRA files)."""
    for name, module in modules.items():
        updates.setdefault(name, []).append(module)


def read_loras(paths: Sequence[str], scales: Sequence[float]) -> Updates:
    """Several LoRA files, each with its own scale, as the updates of every base weight, in file order.

    Applying them in that order to `W` in fp32 gives the same numbers as merging them one after another."""
    updates: Updates = {}
    for path, scale in zip(paths, scales):
        add_updates(updates, read_lora(path, scale))
    return dict(sorted(updates.items()))
