"""Writing the merged transformer as one safetensors file in the original SD3 layout (out.format=single_file).

The file is written by hand in the safetensors format (8-byte header length, JSON header, raw data) so
that only one original tensor (at most the three q, k, v tensors of one attention) is in memory at a
time, however large the model.
"""
import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from shards.errors import DataError

from .fold import FILE_METADATA, OUT_DTYPES, FoldResult, _out_tensor, check_targets, modules_for
from .lora import Updates
from .sd3_keys import COPY, Group, combine, output_shape, plan, vae_plan
from .sources import Source

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


@dataclass(frozen=True)
class Job:
    """One tensor of the file: the group that makes it, where its sources are, what to fold in, its dtype rule."""
    group: Group
    source: Source
    updates: Updates
    dtype: str  # out.dtype for the transformer; "auto" (unchanged) for everything else


def transformer_jobs(source: Source, updates: Updates, dtype: str) -> List[Job]:
    """The merged transformer, in the original layout, from diffusers-named tensors (either layout's Source)."""
    check_targets(updates, source)
    return [Job(g, source, updates, dtype) for g in plan(source.names)]


def vae_jobs(source: Source) -> List[Job]:
    """A diffusers AutoencoderKL under first_stage_model.* (LDM layout), unchanged."""
    return [Job(g, source, {}, "auto") for g in vae_plan(source.names)]


def copy_jobs(source: Source) -> List[Job]:
    """Every tensor of `source` under its own name, unchanged (bundled text encoders, a base file's extras)."""
    return [Job(Group(name, (name,), COPY), source, {}, "auto") for name in source.names]


def write_single_file(jobs: List[Job], path: str, progress: bool = True) -> FoldResult:
    """Write every job's tensor into one safetensors file at `path`, sorted by key, one tensor in memory at a time."""
    jobs = sorted(jobs, key=lambda job: job.group.key)
    keys = [job.group.key for job in jobs]
    for a, b in zip(keys, keys[1:]):
        if a == b:
            raise DataError(f"two components would both write '{a}' into the single file")
    entries, offset = {}, 0
    for job in jobs:
        g, src = job.group, job.source
        dtypes = {_out_dtype(src.dtype(s), job.dtype, s) for s in g.sources}
        if len(dtypes) > 1:
            raise DataError(f"{', '.join(g.sources)} have different dtypes and cannot be fused into '{g.key}'; "
                            "set out.dtype")
        (t_dtype,) = dtypes
        shape = output_shape(g, [src.shape(s) for s in g.sources])
        size = torch.Size(shape).numel() * t_dtype.itemsize
        entries[g.key] = {"dtype": _ST_DTYPES[t_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size

    header = _header(entries)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        with tqdm(jobs, desc="merge", unit="tensor", disable=not progress) as bar:
            for job in bar:
                g = job.group
                parts = [_out_tensor(s, job.source.get(s), modules_for(job.updates, s), job.dtype) for s in g.sources]
                t = combine(g, parts).contiguous()
                e = entries[g.key]
                if list(t.shape) != e["shape"] or _ST_DTYPES[t.dtype] != e["dtype"]:  # a bug, not bad input
                    raise AssertionError(f"{g.key}: made {t.dtype} {tuple(t.shape)}, header says {e}")
                out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    modules = sum(len(m) for m in next((j.updates for j in jobs if j.updates), {}).values())
    return FoldResult(modules=modules, tensors=len(jobs), files=[os.path.basename(path)])
