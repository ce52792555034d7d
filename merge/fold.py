"""Folding LoRA modules into the base transformer, one tensor at a time, into (sharded) safetensors."""
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from shards.errors import DataError
from shards.format import TORCH_DTYPES

from .lora import LoraModule

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
OUT_DTYPES = TORCH_DTYPES
FILE_METADATA = {"format": "pt"}  # what diffusers writes; nothing run-specific, so reruns give the same bytes


@dataclass
class FoldResult:
    modules: int  # LoRA modules folded
    tensors: int  # tensors written
    files: List[str]  # weight files written (no index), relative to the output transformer folder


def base_tensor_files(transformer_dir: str, what: str = "base transformer") -> Dict[str, str]:
    """Tensor name -> file holding it, for a single-file or sharded diffusers model folder (`what`, for messages)."""
    index = os.path.join(transformer_dir, INDEX_NAME)
    single = os.path.join(transformer_dir, WEIGHTS_NAME)
    try:
        if os.path.isfile(index):  # diffusers prefers the index when both are present
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            where = {name: os.path.join(transformer_dir, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                where = {name: single for name in f.keys()}
        else:
            raise DataError(f"{transformer_dir} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}; "
                            f"merge needs the {what} in safetensors")
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise DataError(f"cannot read the {what} in {transformer_dir}: {e!r}") from None
    for file in sorted(set(where.values())):
        if not os.path.isfile(file):
            raise DataError(f"{index} names {os.path.basename(file)}, which is not in {transformer_dir}")
    return where


def check_targets(lora: Dict[str, LoraModule], shapes: Dict[str, tuple]) -> None:
    """Fail before writing anything if a LoRA module has no base weight of its shape."""
    for name, m in sorted(lora.items()):
        key = name + ".weight"
        if key not in shapes:
            raise DataError(f"LoRA module '{name}' matches no tensor of the base transformer (no '{key}')")
        update = (m.up.shape[0], m.down.shape[1])
        if tuple(shapes[key]) != update:
            raise DataError(f"LoRA module '{name}' makes a {update[0]}x{update[1]} update but the base "
                            f"'{key}' has shape {tuple(shapes[key])}")


def _out_tensor(name: str, w: torch.Tensor, module: Optional[LoraModule], dtype: str) -> torch.Tensor:
    if module is not None and not w.is_floating_point():
        raise DataError(f"LoRA module '{module.name}' targets '{name}', which holds {w.dtype} values, not weights")
    target = OUT_DTYPES.get(dtype, w.dtype) if w.is_floating_point() else w.dtype
    if module is None and target == w.dtype:
        return w
    out = (w.float() + module.delta()).to(target) if module is not None else w.to(target)
    if not torch.isfinite(out).all():  # also catches values that overflow a narrower out.dtype
        what = "after folding the LoRA" if module is not None else f"after casting to {dtype}"
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


def fold_transformer(base_dir: str, lora: Dict[str, LoraModule], out_dir: str, dtype: str = "auto",
                     max_shard_bytes: int = 5_000_000_000, progress: bool = True) -> FoldResult:
    """Write `W + delta` for every LoRA target and every other base tensor unchanged (or cast) into out_dir.

    Holds at most one output shard in memory. Shards are written under provisional names and renamed
    once their count is known, so the names match diffusers' `-0000i-of-0000n` scheme.
    """
    where = base_tensor_files(base_dir)
    try:
        parts, used, total_bytes = _write_parts(where, lora, out_dir, dtype, max_shard_bytes, progress)
    except SafetensorError as e:  # a truncated or corrupt base file
        raise DataError(f"cannot read the base transformer in {base_dir}: {e}") from None
    if used != set(lora):  # check_targets rules this out; kept because a partial merge would look fine
        raise DataError(f"LoRA modules not folded: {', '.join(sorted(set(lora) - used))}")
    files, weight_map = _shard_names(len(parts)), {}
    for (part, names), file in zip(parts, files):
        os.replace(os.path.join(out_dir, part), os.path.join(out_dir, file))
        weight_map.update({n: file for n in names})
    if len(files) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return FoldResult(modules=len(used), tensors=len(where), files=files)


def _write_parts(where, lora, out_dir, dtype, max_shard_bytes, progress):
    """Stream every base tensor through _out_tensor into provisionally named shards of at most max_shard_bytes."""
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in sorted(set(where.values()))}
        shapes = {name: tuple(handles[file].get_slice(name).get_shape()) for name, file in where.items()}
        check_targets(lora, shapes)

        os.makedirs(out_dir, exist_ok=True)
        parts, used = [], set()
        shard: Dict[str, torch.Tensor] = {}
        shard_bytes = total_bytes = 0

        def flush():
            part = f"part-{len(parts):05d}.safetensors"
            _save(shard, os.path.join(out_dir, part))
            parts.append((part, sorted(shard)))
            shard.clear()

        # The context closes the bar on errors too, so an error message starts on its own line.
        with tqdm(sorted(where), desc="merge", unit="tensor", disable=not progress) as bar:
            for name in bar:
                module = lora.get(name[: -len(".weight")]) if name.endswith(".weight") else None
                t = _out_tensor(name, handles[where[name]].get_tensor(name), module, dtype)
                if module is not None:
                    used.add(module.name)
                size = t.numel() * t.element_size()
                if shard and shard_bytes + size > max_shard_bytes:
                    flush()
                    shard_bytes = 0
                shard[name] = t
                shard_bytes += size
                total_bytes += size
        flush()
    return parts, used, total_bytes
