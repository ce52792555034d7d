"""Shard set writing: one `ShardWriter` per shard, `assemble` to complete the set.

A shard is complete once its sidecar `shard-NNNNNN.json` exists: the tar is renamed into place first,
then the sidecar is written atomically. A run killed at any moment therefore leaves complete shards
(kept by the next run) and at most one temp file (discarded). `assemble` writes `rejected.jsonl` and,
last, `manifest.json` once every planned shard is complete; its presence is what makes a set whole.
"""
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import replace
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from . import format as F
from .common.atomic import write_bytes, write_json
from .common.dtypes import STORAGE_DTYPES
from .common.errors import UsageError
from .common.fingerprint import file_sha256
from .manifest import Manifest, SampleSpec
from .samples import pack


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner and time: the same samples give the same shard bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = "shardtune"
    tar.addfile(info, io.BytesIO(data))


def encode_sample(tensors: Dict[str, torch.Tensor], dtype: torch.dtype, metadata: Optional[dict] = None) -> bytes:
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return st_save(out, metadata=metadata)


def torch_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise UsageError(f"shard dtype '{name}' is not one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def shard_name(index: int) -> str:
    return F.SHARD_PATTERN.format(index)


def sidecar_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, os.path.splitext(shard_name(index))[0] + ".json")


class ShardWriter:
    """Samples and rejects of one shard; `finish` makes it complete."""

    def __init__(self, out_dir: str, index: int, dtype: str = "bf16", spec: Optional[SampleSpec] = None):
        """`spec`: how samples are stored (format v2); None stores them as format v1 does (the view itself)."""
        self.out_dir, self.index, self.name, self.spec = out_dir, index, shard_name(index), spec
        self.dtype = torch_dtype(dtype)
        self.tmp = os.path.join(out_dir, self.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.keys, self.content, self.sources, self.buckets, self.rejected = [], [], [], [], []

    def add(self, key: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        missing = [t for t in F.SAMPLE_TENSORS if t not in tensors]
        if missing:
            raise ValueError(f"sample {key} lacks tensors {missing}")
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/' (webdataset splits on them)")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key}")
        meta = {"key": key, **meta}
        stored = pack(self.spec, tensors) if self.spec is not None else tensors
        _tar_member(self._tar, f"{key}.safetensors", encode_sample(stored, self.dtype))
        _tar_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.keys.append(key)
        self.content.append(meta.get("sha256", ""))
        self.sources.append(meta.get("source", ""))
        self.buckets.append("{}x{}".format(*meta["bucket"]))

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append({"source": source, "reason": reason})

    def finish(self, extra: Optional[dict] = None) -> dict:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = os.path.join(self.out_dir, self.name)
        os.replace(self.tmp, final)
        record = {"index": self.index, "name": self.name, "samples": len(self.keys),
                  "bytes": os.path.getsize(final), "sha256": file_sha256(final), "keys": self.keys,
                  "content": self.content, "sources": self.sources, "buckets": self.buckets,
                  "rejected": self.rejected, **(extra or {})}
        write_json(sidecar_path(self.out_dir, self.index), record)
        return record

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def read_sidecar(out_dir: str, index: int) -> Optional[dict]:
    """The record of a complete shard, or None when the shard must be (re)done."""
    path = sidecar_path(out_dir, index)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    tar = os.path.join(out_dir, record.get("name", ""))
    if not os.path.isfile(tar) or os.path.getsize(tar) != record.get("bytes"):
        return None
    return record


EXTRAS_METADATA = "shardtune"  # the extras file's one metadata entry: JSON of the fields given to write_extras


def write_extras(out_dir: str, tensors: Dict[str, torch.Tensor], dtype: str, metadata: Optional[dict] = None) -> None:
    missing = [t for t in F.EXTRAS_TENSORS if t not in tensors]
    if missing:
        raise ValueError(f"extras lack tensors {missing}")
    # One metadata entry: safetensors writes several in a per-process random order, and the same
    # extras must give the same bytes (and sha256) in every run.
    md = {EXTRAS_METADATA: json.dumps(metadata, sort_keys=True)} if metadata else None
    write_bytes(os.path.join(out_dir, F.EXTRAS), encode_sample(tensors, torch_dtype(dtype), md))


def _extras_record(out_dir: str) -> dict:
    path = os.path.join(out_dir, F.EXTRAS)
    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    if EXTRAS_METADATA in raw:
        meta = json.loads(raw[EXTRAS_METADATA])
    else:  # written with one entry per field
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return {"name": F.EXTRAS, "sha256": file_sha256(path), **meta}


def _file_record(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def set_files(out_dir: str, records: list) -> Dict[str, dict]:
    """Size and sha256 of every file of the set besides the manifest and the shards it lists with theirs:
    extras, rejects, each shard's record, run.json, and shards that hold no sample (only rejects).
    Named one by one rather than listed from the folder, so a lock file or anything else a user keeps
    there is not taken for part of the set."""
    names = [F.EXTRAS, F.REJECTED, F.RUN_STATE]
    names += [os.path.basename(sidecar_path(out_dir, r["index"])) for r in records]
    names += [r["name"] for r in records if not r["samples"]]
    return {n: _file_record(os.path.join(out_dir, n)) for n in sorted(names) if os.path.exists(os.path.join(out_dir, n))}


def write_manifest(out_dir: str, manifest: Manifest) -> Manifest:
    """Write manifest.json with `manifest_sha256` over the rest of it (see shards.format.manifest_digest)."""
    manifest = replace(manifest, manifest_sha256=None)
    manifest = replace(manifest, manifest_sha256=F.manifest_digest(manifest.to_json()))
    write_json(os.path.join(out_dir, F.MANIFEST), manifest.to_json())
    return manifest


def _numerics_groups(records: list) -> list:
    """[{"settings": what computed them (None: not recorded), "shards": [index, ...]}, ...] in shard order;
    empty when no shard recorded its numerics (sets not made by precompute)."""
    groups = []
    for r in records:
        settings = r.get("numerics")
        group = next((g for g in groups if g["settings"] == settings), None)
        if group is None:
            groups.append(group := {"settings": settings, "shards": []})
        group["shards"].append(r["index"])
    return groups if any(g["settings"] is not None for g in groups) else []


def assemble(out_dir: str, n_shards: int, fields: dict, dtype: str) -> Optional[Manifest]:
    """Write rejected.jsonl and manifest.json if all `n_shards` shards are complete; else None. `fields` say
    how the shards store their samples (`format_version` and, from v2, `stored`: as the ShardWriters' spec;
    without them, format v1).

    Duplicates across shards (same content hash) are found here, in shard order, so one run and
    several `part` runs give the same set: later copies are listed under `excluded` and skipped by readers.
    """
    records = [read_sidecar(out_dir, i) for i in range(n_shards)]
    if any(r is None for r in records) or not os.path.exists(os.path.join(out_dir, F.EXTRAS)):
        return None
    first_of, excluded, rejects = {}, {}, []
    buckets, truncated, total = Counter(), Counter(), 0
    for r in records:
        rejects += r["rejected"]
        truncated.update(r.get("truncated", {}))
        for key, digest, source in zip(r["keys"], r["content"], r["sources"]):
            if digest and digest in first_of:
                excluded[key] = f"duplicate: same content as {first_of[digest]}"
                rejects.append({"source": source, "reason": excluded[key]})
            else:
                first_of.setdefault(digest, source)
        total += r["samples"]
    for r in records:  # bucket histogram of what readers will see
        buckets.update(b for key, b in zip(r["keys"], r["buckets"]) if key not in excluded)
    write_bytes(os.path.join(out_dir, F.REJECTED), "".join(json.dumps(rec) + "\n" for rec in rejects).encode())
    reasons = Counter(rec["reason"].split(":")[0] for rec in rejects)
    manifest = {
        "format": F.FORMAT_NAME, "format_version": 1, "producer": F.producer(),
        **fields,
        "dtype": dtype,
        "buckets": dict(sorted(buckets.items())),
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in records if r["samples"]],
        "counts": {"seen": total + sum(len(r["rejected"]) for r in records), "written": total - len(excluded),
                   "rejected": len(rejects)},
        "rejected_reasons": dict(reasons),
        "truncated_captions": {"clip": truncated["clip"], "t5": truncated["t5"]},
        "excluded": excluded,
        "extras": _extras_record(out_dir),
        "files": set_files(out_dir, records),
    }
    groups = _numerics_groups(records)
    if groups:
        manifest["numerics"] = groups
    return write_manifest(out_dir, Manifest.from_json(manifest, f"the manifest of {out_dir}"))


def check_writable(out_dir: str, overwrite: bool) -> None:
    """Refuse to replace a complete shard set unless asked to (call before any slow work)."""
    if os.path.exists(os.path.join(out_dir, F.MANIFEST)) and not overwrite:
        raise UsageError(f"out.dir {out_dir} already holds a complete shard set; "
                         "choose another out.dir or set out.overwrite=true")


def clear_set(out_dir: str) -> None:
    """Remove every file a shard set consists of (and nothing else) from out_dir."""
    for name in os.listdir(out_dir):
        if name in (F.MANIFEST, F.EXTRAS, F.REJECTED, F.RUN_STATE) or name.startswith("shard-") or name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))


class ShardSetWriter:
    """Sequential writer for a whole set (tests, small tools): `add`/`reject`, `write_extras`, `close`."""

    def __init__(self, out_dir: str, dtype: str = "bf16", samples_per_shard: int = 1000, overwrite: bool = False,
                 spec: Optional[SampleSpec] = None):
        check_writable(out_dir, overwrite)
        os.makedirs(out_dir, exist_ok=True)
        clear_set(out_dir)
        self.out_dir, self.dtype, self.per_shard, self.spec = out_dir, dtype, samples_per_shard, spec
        torch_dtype(dtype)
        self.n_shards, self.current, self.in_shard = 0, None, 0

    def _shard(self) -> ShardWriter:
        if self.current is None:
            self.current = ShardWriter(self.out_dir, self.n_shards, self.dtype, self.spec)
            self.n_shards += 1
        return self.current

    def _finish(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current, self.in_shard = None, 0

    def add(self, key: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        self._shard().add(key, tensors, meta)
        self.in_shard += 1
        if self.in_shard >= self.per_shard:
            self._finish()

    def reject(self, source: str, reason: str) -> None:
        self._shard().reject(source, reason)

    def write_extras(self, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
        write_extras(self.out_dir, tensors, self.dtype, metadata)

    def close(self, fields: dict) -> Manifest:
        self._finish()
        stored = {"format_version": self.spec.version, "stored": self.spec.stored_json()} if self.spec else {}
        manifest = assemble(self.out_dir, self.n_shards, {**fields, **stored}, self.dtype)
        if manifest is not None and self.spec is not None and manifest.spec != self.spec:
            raise ValueError(f"the samples were stored as {self.spec}, the manifest's fields say {manifest.spec}")
        if manifest is None:
            raise ValueError("write_extras must be called before close")
        return manifest

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None
