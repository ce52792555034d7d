"""Writing the merged transformer as one safetensors file in the original SD3 layout (out.format=single_file).

The file is written by hand in the safetensors format (8-byte header length, JSON header, raw data) so
that only one original tensor (at most the three q, k, v tensors of one attention) is in memory at a
time, however large the model.
"""
import json
import os
import struct
from contextlib import ExitStack
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from shards.errors import DataError

from .fold import FILE_METADATA, OUT_DTYPES, FoldResult, _out_tensor, base_tensor_files, check_targets
from .lora import LoraModule
from .sd3_keys import Group, combine, output_shape, plan, vae_plan

# Marks a file as this stage's output, so out.overwrite=true can tell an earlier release from a user's file.
SINGLE_FILE_METADATA = {**FILE_METADATA, "shardtune": "merge"}

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def file_name(name: str) -> str:
    return name + ".safetensors"


def is_single_file_release(path: str) -> bool:
    """Whether `path` is a safetensors file this stage wrote (its header carries SINGLE_FILE_METADATA)."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("shardtune") == SINGLE_FILE_METADATA["shardtune"]
    except (OSError, SafetensorError, ValueError):
        return False


def _out_dtype(base: str, dtype: str, name: str) -> torch.dtype:
    if base not in _TORCH_DTYPES:
        raise DataError(f"the base tensor '{name}' has dtype {base}, which out.format=single_file cannot write")
    t = _TORCH_DTYPES[base]
    return OUT_DTYPES.get(dtype, t) if t.is_floating_point else t


def _header(entries: Dict[str, dict]) -> bytes:
    raw = json.dumps({"__metadata__": SINGLE_FILE_METADATA, **entries}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors' own writer pads the header to 8 bytes


def write_single_file(base_dir: str, lora: Dict[str, LoraModule], path: str, dtype: str = "auto",
                      progress: bool = True, vae_dir: Optional[str] = None) -> FoldResult:
    """Fold the LoRA into the base transformer in base_dir and write the result to `path` in the original layout.

    With vae_dir (a diffusers AutoencoderKL folder), its weights go into the same file under first_stage_model.*
    (LDM layout), unchanged: out.dtype applies to the transformer only, as in the diffusers-format release.
    """
    where = base_tensor_files(base_dir)
    # (original tensor, where its sources are, LoRA, out dtype) in the order of the file.
    jobs: List[Tuple[Group, Dict[str, str], Dict[str, LoraModule], str]] = [(g, where, lora, dtype) for g in plan(where)]
    if vae_dir is not None:
        vae_where = base_tensor_files(vae_dir, what="base VAE")
        jobs += [(g, vae_where, {}, "auto") for g in vae_plan(vae_where)]
    jobs.sort(key=lambda job: job[0].key)
    files = sorted({file for _, w, _, _ in jobs for file in w.values()})
    try:
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}

            def get_slice(w, name):
                return handles[w[name]].get_slice(name)

            check_targets(lora, {name: tuple(get_slice(where, name).get_shape()) for name in where})
            entries, offset = {}, 0
            for g, w, _, out_dtype in jobs:
                dtypes = {_out_dtype(get_slice(w, s).get_dtype(), out_dtype, s) for s in g.sources}
                if len(dtypes) > 1:
                    raise DataError(f"{', '.join(g.sources)} have different dtypes and cannot be fused into "
                                    f"'{g.key}'; set out.dtype")
                (t_dtype,) = dtypes
                shape = output_shape(g, [tuple(get_slice(w, s).get_shape()) for s in g.sources])
                size = torch.Size(shape).numel() * t_dtype.itemsize
                entries[g.key] = {"dtype": _ST_DTYPES[t_dtype], "shape": list(shape),
                                  "data_offsets": [offset, offset + size]}
                offset += size

            used = set()
            header = _header(entries)
            with open(path, "wb") as out:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                with tqdm(jobs, desc="merge", unit="tensor", disable=not progress) as bar:
                    for g, w, job_lora, out_dtype in bar:
                        parts = []
                        for name in g.sources:
                            module = job_lora.get(name[: -len(".weight")]) if name.endswith(".weight") else None
                            parts.append(_out_tensor(name, handles[w[name]].get_tensor(name), module, out_dtype))
                            if module is not None:
                                used.add(module.name)
                        t = combine(g, parts).contiguous()
                        e = entries[g.key]
                        if list(t.shape) != e["shape"] or _ST_DTYPES[t.dtype] != e["dtype"]:  # a bug, not bad input
                            raise AssertionError(f"{g.key}: made {t.dtype} {tuple(t.shape)}, header says {e}")
                        out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    except SafetensorError as e:  # a truncated or corrupt base file
        raise DataError(f"cannot read the base model in {base_dir if vae_dir is None else os.path.dirname(base_dir)}: "
                        f"{e}") from None
    if used != set(lora):
        raise DataError(f"LoRA modules not folded: {', '.join(sorted(set(lora) - used))}")
    return FoldResult(modules=len(used), tensors=len(jobs), files=[os.path.basename(path)])
