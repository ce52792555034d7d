"""Folding LoRA modules into the base transformer, one tensor at a time, into (sharded) safetensors."""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from shards.errors import DataError
from shards.format import TORCH_DTYPES

from .lora import LoraModule, Updates
from .sources import DIFFUSERS_WEIGHTS, Source

WEIGHTS_NAME = DIFFUSERS_WEIGHTS
INDEX_NAME = WEIGHTS_NAME + ".index.json"
OUT_DTYPES = TORCH_DTYPES
FILE_METADATA = {"format": "pt"}  # what diffusers writes; nothing run-specific, so reruns give the same bytes


@dataclass
class FoldResult:
    modules: int  # LoRA modules folded
    tensors: int  # tensors written
    files: List[str]  # weight files written (no index), relative to the output transformer folder


def check_targets(updates: Updates, source: Source) -> None:
    """Fail before writing anything if a LoRA module has no base weight of its shape."""
    names = set(source.names)
    for name, modules in updates.items():
        key = name + ".weight"
        if key not in names:
            raise DataError(f"LoRA module '{name}' matches no tensor of the {source.what} (no '{key}')")
        shape = tuple(source.shape(key))
        for m in modules:
            if shape != tuple(m.shape):
                raise DataError(f"LoRA module '{name}' makes a {m.shape[0]}x{m.shape[1]} update but the "
                                f"{source.what}'s '{key}' has shape {shape}")


def modules_for(updates: Updates, name: str) -> List[LoraModule]:
    """The LoRA modules that change the tensor `name` (a module's `.weight`); [] for every other tensor."""
    return updates.get(name[: -len(".weight")], []) if name.endswith(".weight") else []


def _out_tensor(name: str, w: torch.Tensor, modules: Sequence[LoraModule], dtype: str) -> torch.Tensor:
    """`w` with every LoRA delta added in fp32, in order, then cast to out.dtype; refuses non-finite results."""
    if modules and not w.is_floating_point():
        raise DataError(f"LoRA module '{modules[0].name}' targets '{name}', which holds {w.dtype} values, not weights")
    target = OUT_DTYPES.get(dtype, w.dtype) if w.is_floating_point() else w.dtype
    if not modules and target == w.dtype:
        return w
    out = w.float() if modules else w
    for m in modules:
        out = out + m.delta()
    out = out.to(target)
    if not torch.isfinite(out).all():  # also catches values that overflow a narrower out.dtype
        what = "after folding the LoRA" if modules else f"after casting to {dtype}"
        raise DataError(f"tensor '{name}' has non-finite values {what}; lower lora.scale or pick a wider out.dtype")
    return out.contiguous()


def _file_mode() -> int:
    """What open() gives a new file under this process's umask (reading the umask means setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _save(tensors: Dict[str, torch.Tensor], path: str) -> None:
    try:
        save_file(tensors, path, metadata=FILE_METADATA)
    except SafetensorError as e:  # safetensors reports a failed write (disk full, I/O error) as its own type
        raise DataError(f"cannot write {path}: {e}") from None
    # safetensors 0.8 writes through a private temp file (mode 0600); a release must be readable like any file.
    os.chmod(path, _file_mode())


def _shard_names(count: int) -> List[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    stem, ext = os.path.splitext(WEIGHTS_NAME)
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def fold_transformer(source: Source, updates: Updates, out_dir: str, dtype: str = "auto",
                     max_shard_bytes: int = 5_000_000_000, progress: bool = True) -> FoldResult:
    """Write `W + deltas` for every LoRA target and every other tensor of `source` unchanged (or cast) into out_dir.

    Holds at most one output shard in memory. Shards are written under provisional names and renamed
    once their count is known, so the names match diffusers' `-0000i-of-0000n` scheme.
    """
    check_targets(updates, source)
    parts, total_bytes = _write_parts(source, updates, out_dir, dtype, max_shard_bytes, progress)
    files, weight_map = _shard_names(len(parts)), {}
    for (part, names), file in zip(parts, files):
        os.replace(os.path.join(out_dir, part), os.path.join(out_dir, file))
        weight_map.update({n: file for n in names})
    if len(files) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return FoldResult(modules=sum(map(len, updates.values())), tensors=len(source.names), files=files)


def _write_parts(source: Source, updates: Updates, out_dir, dtype, max_shard_bytes, progress):
    """Stream every tensor through _out_tensor into provisionally named shards of at most max_shard_bytes."""
    os.makedirs(out_dir, exist_ok=True)
    parts = []
    shard: Dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush():
        part = f"part-{len(parts):05d}.safetensors"
        _save(shard, os.path.join(out_dir, part))
        parts.append((part, sorted(shard)))
        shard.clear()

    # The context closes the bar on errors too, so an error message starts on its own line.
    with tqdm(source.names, desc="merge", unit="tensor", disable=not progress) as bar:
        for name in bar:
            t = _out_tensor(name, source.get(name), modules_for(updates, name), dtype)
            size = t.numel() * t.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name] = t
            shard_bytes += size
            total_bytes += size
    flush()
    return parts, total_bytes
