"""Folding LoRA modules into the base transformer, one tensor at a time, into (sharded) safetensors."""
import json
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
from tqdm import tqdm

from shards.common.errors import DataError
from shards.common.dtypes import STORAGE_DTYPES

from .lora import LoraModule, Updates
from .sources import DIFFUSERS_WEIGHTS, Source
from shards.common.dtypes import SAFETENSORS_DTYPES
from shards.tensorfile import Planned, nbytes, write_tensor_file

WEIGHTS_NAME = DIFFUSERS_WEIGHTS
INDEX_NAME = WEIGHTS_NAME + ".index.json"
OUT_DTYPES = STORAGE_DTYPES
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
                raise DataError(f"LoRA module '{name}' makes a {'x'.join(map(str, m.shape))} update but the "
                                f"{source.what}'s '{key}' has shape {shape}")


def out_dtype(stored: str, dtype: str, name: str) -> torch.dtype:
    """The dtype a tensor stored as `stored` (safetensors dtype string) gets in the release under out.dtype."""
    if stored not in SAFETENSORS_DTYPES:
        raise DataError(f"the base tensor '{name}' has dtype {stored}, which merge cannot write")
    t = SAFETENSORS_DTYPES[stored]
    return OUT_DTYPES.get(dtype, t) if t.is_floating_point else t


def modules_for(updates: Updates, name: str) -> List[LoraModule]:
    """The LoRA modules that change the tensor `name` (a module's `.weight`); [] for every other tensor."""
    return updates.get(name[: -len(".weight")], []) if name.endswith(".weight") else []


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in a floating tensor: one min/max pass (NaN propagates through both), no bool copy."""
    if not t.numel():
        return True
    if t.dtype.itemsize == 1:  # fp8: no aminmax kernels; fp32 keeps its NaN and inf
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _out_tensor(name: str, w: torch.Tensor, modules: Sequence[LoraModule], dtype: str) -> torch.Tensor:
    """`w` with every LoRA delta added in fp32, in order, then cast to out.dtype; refuses non-finite results."""
    if modules and not w.is_floating_point():
        raise DataError(f"LoRA module '{modules[0].name}' targets '{name}', which holds {w.dtype} values, not weights")
    target = OUT_DTYPES.get(dtype, w.dtype) if w.is_floating_point() else w.dtype
    if not modules and target == w.dtype:
        return w
    out = w.float() if modules else w
    if modules and out is w:  # already fp32: do not change the caller's tensor in place
        out = w.clone()
    for m in modules:
        m.add_to(out)
    out = out.to(target)
    if not all_finite(out):  # also catches values that overflow a narrower out.dtype
        what = "after folding the LoRA" if modules else f"after casting to {dtype}"
        raise DataError(f"tensor '{name}' has non-finite values {what}; lower lora.scale or pick a wider out.dtype")
    return out.contiguous()


def _shard_names(count: int, weights_name: str = WEIGHTS_NAME) -> List[str]:
    if count == 1:
        return [weights_name]
    stem, ext = os.path.splitext(weights_name)
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def fold_transformer(source: Source, updates: Updates, out_dir: str, dtype: str = "auto",
                     max_shard_bytes: int = 5_000_000_000, progress: bool = True) -> FoldResult:
    """Write `W + deltas` for every LoRA target and every other tensor of `source` unchanged (or cast) into out_dir.

    Shards of at most max_shard_bytes (a larger tensor gets a shard of its own) with diffusers' names and index,
    streamed: one tensor in memory at a time.
    """
    return fold_model(source, updates, out_dir, dtype, max_shard_bytes, progress)


def fold_model(source: Source, updates: Updates, out_dir: str, dtype: str = "auto",
               max_shard_bytes: int = 5_000_000_000, progress: bool = True,
               weights_name: str = WEIGHTS_NAME) -> FoldResult:
    """fold_transformer for any model folder: `weights_name` is model.safetensors for the text encoders
    (transformers' name, with its index and shard names built the same way)."""
    check_targets(updates, source)
    planned = [_planned(source, updates, name, dtype) for name in source.names]
    shards: List[List[Planned]] = [[]]
    size = 0
    for p in planned:
        n = nbytes(p[1], p[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    files = _shard_names(len(shards), weights_name)
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    with tqdm(total=len(planned), desc="merge", unit="tensor", disable=not progress) as bar:
        for shard, file in zip(shards, files):
            if os.path.lexists(os.path.join(out_dir, file)):
                # Never written through: a file already there may be a hard link to the base's own.
                os.unlink(os.path.join(out_dir, file))
            total += write_tensor_file(os.path.join(out_dir, file), shard, FILE_METADATA,
                                       done=lambda name: bar.update())
    if len(files) > 1:
        weight_map = {p[0]: file for shard, file in zip(shards, files) for p in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, weights_name + ".index.json"), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return FoldResult(modules=sum(map(len, updates.values())), tensors=len(source.names), files=files)


def unchanged(source: Source, name: str, modules: Sequence[LoraModule], to: torch.dtype) -> bool:
    """Whether the tensor goes into the release byte for byte: no LoRA on it and its stored dtype kept."""
    return not modules and SAFETENSORS_DTYPES[source.dtype(name)] == to


def _planned(source: Source, updates: Updates, name: str, dtype: str) -> Planned:
    modules = modules_for(updates, name)
    to = out_dtype(source.dtype(name), dtype, name)

    def make():
        spans = source.spans(name) if unchanged(source, name, modules, to) else None
        return spans if spans is not None else _out_tensor(name, source.get(name), modules, dtype)
    return name, to, source.shape(name), make
