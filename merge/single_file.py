"""Writing the merged transformer as one safetensors file in the original SD3 layout (out.format=single_file).

The file is streamed (shards/tensorfile.py) so that only one original tensor (at most the three q, k, v
tensors of one attention) is in memory at a time, however large the model.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

from tqdm import tqdm

from shards.common.errors import DataError

from .fold import FILE_METADATA, FoldResult, _out_tensor, check_targets, modules_for, out_dtype, unchanged
from .lora import Updates
from .sd3_keys import COPY, PREFIX, Group, combine, combine_spans, output_shape, plan, vae_plan
from .sources import Source
from shards.tensorfile import Planned, read_metadata, write_tensor_file

# Marks a file as this stage's output, so out.overwrite=true can tell an earlier release from a user's file.
SINGLE_FILE_METADATA = {**FILE_METADATA, "shardtune": "merge"}


def file_name(name: str) -> str:
    return name + ".safetensors"


def is_single_file_release(path: str) -> bool:
    """Whether `path` is a safetensors file this stage wrote (its header carries SINGLE_FILE_METADATA)."""
    try:
        return read_metadata(path).get("shardtune") == SINGLE_FILE_METADATA["shardtune"]
    except (OSError, DataError):
        return False


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


def copy_jobs(source: Source, updates: Optional[Updates] = None) -> List[Job]:
    """Every tensor of `source` under its own name, unchanged (bundled text encoders, a base file's extras)
    except for the LoRA deltas in `updates` (text encoder LoRAs, by the source's own module names), which keep
    each tensor's stored dtype."""
    if updates:
        check_targets(updates, source)
    return [Job(Group(name, (name,), COPY), source, updates or {}, "auto") for name in source.names]


def _planned(job: Job) -> Planned:
    g, src = job.group, job.source
    dtypes = {out_dtype(src.dtype(s), job.dtype, s) for s in g.sources}
    if len(dtypes) > 1:
        raise DataError(f"{', '.join(g.sources)} have different dtypes and cannot be fused into '{g.key}'; set out.dtype")
    shape = output_shape(g, [src.shape(s) for s in g.sources])

    to = dtypes.pop()

    def make():
        if all(unchanged(src, s, modules_for(job.updates, s), to) for s in g.sources):
            parts = [src.spans(s) for s in g.sources]
            if all(p is not None for p in parts):
                return combine_spans(g, parts)
        return combine(g, [_out_tensor(s, src.get(s), modules_for(job.updates, s), job.dtype) for s in g.sources])
    return g.key, to, tuple(shape), make


def write_single_file(jobs: List[Job], path: str, progress: bool = True) -> FoldResult:
    """Write every job's tensor into one safetensors file at `path`, sorted by key, one tensor in memory at a time."""
    jobs = sorted(jobs, key=lambda job: job.group.key)
    keys = [job.group.key for job in jobs]
    for a, b in zip(keys, keys[1:]):
        if a == b:
            raise DataError(f"two components would both write '{a}' into the single file")
    planned = [_planned(job) for job in jobs]
    # The context closes the bar on errors too, so an error message starts on its own line.
    with tqdm(total=len(planned), desc="merge", unit="tensor", disable=not progress) as bar:
        write_tensor_file(path, planned, SINGLE_FILE_METADATA, done=lambda name: bar.update())
    # The transformer's modules: text encoder LoRAs folded into bundled encoders are counted by their caller.
    modules = sum(len(m) for m in next((j.updates for j in jobs if j.updates and j.group.key.startswith(PREFIX)),
                                       {}).values())
    return FoldResult(modules=modules, tensors=len(jobs), files=[os.path.basename(path)])
