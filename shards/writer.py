"""Shard set writer: tar shards of safetensors+json samples, extras, rejects, manifest last."""
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from typing import Dict, Optional

import torch
from safetensors.torch import save as st_save

from . import format as F
from .atomic import write_bytes, write_json
from .fingerprint import file_sha256
from .errors import UsageError

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def check_writable(out_dir: str, overwrite: bool) -> None:
    """Refuse to replace a complete shard set unless asked to (call before any slow work)."""
    if os.path.exists(os.path.join(out_dir, F.MANIFEST)) and not overwrite:
        raise UsageError(f"out.dir {out_dir} already holds a complete shard set; "
                         "choose another out.dir or set out.overwrite=true")


class ShardSetWriter:
    """Writes one shard set. `add` samples, `reject` inputs, then `close(manifest_fields)`.

    Each shard is written to `NAME.tmp` and renamed only once complete, and `manifest.json`
    is written after everything else, so its presence means the set is whole.
    """

    def __init__(self, out_dir: str, dtype: str = "bf16", samples_per_shard: int = 1000, overwrite: bool = False):
        if dtype not in _TORCH_DTYPES:
            raise UsageError(f"shard dtype '{dtype}' is not one of {', '.join(_TORCH_DTYPES)}")
        self.out_dir = out_dir
        self.dtype_name = dtype
        self.dtype = _TORCH_DTYPES[dtype]
        self.samples_per_shard = samples_per_shard
        check_writable(out_dir, overwrite)
        os.makedirs(out_dir, exist_ok=True)
        self._clear_previous()
        self.shards = []
        self.buckets = Counter()
        self.keys = set()
        self.rejected = 0
        self.written = 0
        self._tar = None
        self._tar_file = None
        self._in_shard = 0
        self._rejects = open(os.path.join(out_dir, F.REJECTED + ".tmp"), "w")

    def _clear_previous(self) -> None:
        for name in os.listdir(self.out_dir):
            if name == F.MANIFEST or name.startswith("shard-") or name in (F.EXTRAS, F.REJECTED) or name.endswith(".tmp"):
                os.remove(os.path.join(self.out_dir, name))

    def _open_shard(self) -> None:
        name = F.SHARD_PATTERN.format(len(self.shards))
        self._shard_name = name
        self._tar_file = open(os.path.join(self.out_dir, name + ".tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar_file.flush()
        os.fsync(self._tar_file.fileno())
        self._tar_file.close()
        tmp = os.path.join(self.out_dir, self._shard_name + ".tmp")
        final = os.path.join(self.out_dir, self._shard_name)
        os.replace(tmp, final)
        self.shards.append({"name": self._shard_name, "samples": self._in_shard,
                            "bytes": os.path.getsize(final), "sha256": file_sha256(final)})
        self._tar = self._tar_file = None

    def add(self, key: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        missing = [t for t in F.SAMPLE_TENSORS if t not in tensors]
        if missing:
            raise ValueError(f"sample {key} lacks tensors {missing}")
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/' (webdataset splits on them)")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key}")
        if self._tar is None:
            self._open_shard()
        meta = {"key": key, **meta}
        _tar_member(self._tar, f"{key}.safetensors", encode_sample(tensors, self.dtype))
        _tar_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.keys.add(key)
        self.buckets["{}x{}".format(*meta["bucket"])] += 1
        self.written += 1
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    def reject(self, source: str, reason: str, **extra) -> None:
        self._rejects.write(json.dumps({"source": source, "reason": reason, **extra}) + "\n")
        self.rejected += 1

    def finish_rejects(self) -> None:
        """Put rejected.jsonl in place (also when the run stops because nothing was usable)."""
        if self._rejects.closed:
            return
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        self._rejects.close()
        os.replace(os.path.join(self.out_dir, F.REJECTED + ".tmp"), os.path.join(self.out_dir, F.REJECTED))

    def write_extras(self, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> dict:
        missing = [t for t in F.EXTRAS_TENSORS if t not in tensors]
        if missing:
            raise ValueError(f"extras lack tensors {missing}")
        md = {k: json.dumps(v) for k, v in (metadata or {}).items()}
        data = encode_sample(tensors, self.dtype, md or None)
        write_bytes(os.path.join(self.out_dir, F.EXTRAS), data)
        self.extras = {"name": F.EXTRAS, "sha256": hashlib.sha256(data).hexdigest(), **(metadata or {})}
        return self.extras

    def close(self, fields: dict, seen: int) -> dict:
        """Finish the last shard and write the manifest; `fields` holds model/encoder facts."""
        self._finish_shard()
        self.finish_rejects()
        if not hasattr(self, "extras"):
            raise ValueError("write_extras must be called before close")
        manifest = {
            "format": F.FORMAT_NAME,
            "format_version": F.FORMAT_VERSION,
            "producer": F.producer(),
            **fields,
            "dtype": self.dtype_name,
            "buckets": dict(sorted(self.buckets.items())),
            "shards": self.shards,
            "counts": {"seen": seen, "written": self.written, "rejected": self.rejected},
            "extras": self.extras,
        }
        absent = [f for f in F.MANIFEST_FIELDS if f not in manifest]
        if absent:
            raise ValueError(f"manifest lacks fields {absent}")
        write_json(os.path.join(self.out_dir, F.MANIFEST), manifest)
        return manifest

    def abort(self) -> None:
        """Leave no temp files behind after a failure (finished shards stay; there is no manifest)."""
        if self._tar is not None:
            self._tar_file.close()
            os.remove(os.path.join(self.out_dir, self._shard_name + ".tmp"))
            self._tar = None
        if not self._rejects.closed:
            self._rejects.close()
            os.remove(os.path.join(self.out_dir, F.REJECTED + ".tmp"))

