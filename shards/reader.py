"""Reading shard sets: `read_manifest`, `read_samples`, `read_extras`, local or remote.

Shards are read as a stream (tar `r|` mode over a file or a webdataset `gopen` stream) and hashed on
the way; a shard whose bytes differ from the manifest's sha256 stops the reader with an error rather
than feeding silently corrupted tensors onward.
"""
import hashlib
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional, Union

import torch
from safetensors.torch import load as st_load

from . import format as F
from .errors import DataError, UsageError


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def _open(path: str):
    if is_url(path):
        from webdataset.gopen import gopen
        return gopen(path, "rb")
    return open(path, "rb")


def _read_bytes(path: str) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; the shard set is damaged: run `python -m shards verify` on it") from None
    except Exception as e:  # a URL stream reports failures as many types with long reprs
        raise DataError(f"cannot read {path} ({type(e).__name__}); check the path or URL and the network") from None


def read_manifest(path_or_url: str) -> dict:
    """The manifest of a complete shard set; a set without one is incomplete and refused."""
    where = _join(path_or_url, F.MANIFEST)
    if not is_url(path_or_url):
        if not os.path.isdir(path_or_url):
            raise UsageError(f"no such shard set folder: {path_or_url}")
        if not os.path.exists(where):
            if any(n.startswith("shard-") for n in os.listdir(path_or_url)):
                raise DataError(f"{path_or_url} has no {F.MANIFEST}: the shard set is incomplete "
                                "(precompute did not finish); run the same precompute command again")
            raise DataError(f"{path_or_url} is not a shard set (no {F.MANIFEST}); "
                            "give a folder written by `python -m precompute`")
    try:
        manifest = json.loads(_read_bytes(where))
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != F.FORMAT_NAME:
        raise DataError(f"{where} is not a shardtune shard set manifest")
    if manifest.get("format_version") != F.FORMAT_VERSION:
        raise DataError(f"{where} has format version {manifest.get('format_version')}, "
                        f"this shardtune reads version {F.FORMAT_VERSION}; recompute the set")
    return manifest


def shard_urls(path_or_url: str, manifest: dict = None) -> List[str]:
    manifest = manifest or read_manifest(path_or_url)
    return [_join(path_or_url, s["name"]) for s in manifest["shards"]]


def check_shard_files(path: str, manifest: dict) -> None:
    """Cheap pre-flight check of a local set: every shard and the extras exist with the right size."""
    if is_url(path):
        return
    for s in manifest["shards"]:
        f = os.path.join(path, s["name"])
        if not os.path.exists(f):
            raise DataError(f"{f} is missing; the shard set is damaged: run `python -m shards verify {path}`")
        if os.path.getsize(f) != s["bytes"]:
            raise DataError(f"{f} has {os.path.getsize(f)} bytes, the manifest says {s['bytes']}: "
                            f"the shard set is damaged; run `python -m shards verify {path}`")
    if not os.path.exists(os.path.join(path, F.EXTRAS)):
        raise DataError(f"{os.path.join(path, F.EXTRAS)} is missing; the shard set is damaged")


def decode_sample(members: Dict[str, bytes]) -> dict:
    """One sample's tar members (by extension) -> tensors + `key` + `meta`."""
    tensors = st_load(members["safetensors"])
    meta = json.loads(members["json"])
    return {**tensors, "key": meta["key"], "meta": meta}


class _Hashing:
    """File-like wrapper that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        return b


def iter_tar(url: str, sha256: Optional[str] = None) -> Iterator[Dict[str, bytes]]:
    """Raw samples of one shard (`{"__key__", ext: bytes}`) in file order; checks `sha256` at the end."""
    name = os.path.basename(url)
    try:
        with _open(url) as raw:
            stream = _Hashing(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                sample = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if sample and key != sample["__key__"]:
                        yield sample
                        sample = {}
                    sample["__key__"] = key
                    sample[ext] = tar.extractfile(member).read()
                if sample:
                    yield sample
            while stream.read(1 << 20):  # tar end padding still counts towards the hash
                pass
    except FileNotFoundError:
        raise DataError(f"{url} is missing; the shard set is damaged: run `python -m shards verify`") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{url}: unreadable shard ({type(e).__name__}: {str(e)[:120]}); "
                        "the shard set is damaged: run `python -m shards verify` and precompute it again") from None
    if sha256 is not None and stream.h.hexdigest() != sha256:
        raise DataError(f"{name}: its sha256 differs from the manifest (corrupt or replaced); "
                        "run `python -m shards verify` and precompute the set again")


def _decoded(url: str, sha256: Optional[str]) -> Iterator[Dict]:
    for raw in iter_tar(url, sha256):
        try:
            yield decode_sample(raw)
        except Exception as e:  # a damaged member decodes to garbage before the hash check can run
            raise DataError(f"{url}: sample {raw.get('__key__')} cannot be decoded ({type(e).__name__}); "
                            "the shard set is damaged: run `python -m shards verify`") from None


def read_samples(path_or_url: Union[str, List[str]]) -> Iterator[Dict]:
    """Every sample of a shard set (folder or URL), or of one tar / a list of tars, in order.

    For a set, each shard's bytes are checked against the manifest's sha256 as they stream past.
    """
    excluded = {}
    if isinstance(path_or_url, (list, tuple)):
        shards = [(u, None) for u in path_or_url]
    elif path_or_url.endswith(".tar"):
        shards = [(path_or_url, None)]
    else:
        manifest = read_manifest(path_or_url)
        shards = [(_join(path_or_url, s["name"]), s["sha256"]) for s in manifest["shards"]]
        excluded = manifest.get("excluded", {})
    for url, sha in shards:
        for sample in _decoded(url, sha):
            if sample["key"] not in excluded:  # later copies of an image found in another shard
                yield sample


def read_extras(path_or_url: str) -> Dict[str, torch.Tensor]:
    """Empty-prompt and validation-prompt embeddings; prompts' text is in the manifest."""
    where = _join(path_or_url, F.EXTRAS)
    data = _read_bytes(where)
    try:
        return st_load(data)
    except Exception as e:
        raise DataError(f"{where} cannot be read ({type(e).__name__}); the shard set is damaged") from None


def read_rejected(path: str) -> List[dict]:
    p = os.path.join(path, F.REJECTED)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]
