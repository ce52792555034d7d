"""Reading shard sets: `read_manifest`, `read_samples`, `read_extras`, local or remote."""
import json
import os
from typing import Dict, Iterator, List, Union

import torch
from safetensors.torch import load as st_load

from . import format as F
from .errors import DataError, UsageError


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if _is_url(base) else os.path.join(base, name)


def _read_bytes(path: str) -> bytes:
    if _is_url(path):
        from webdataset.gopen import gopen
        with gopen(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_manifest(path_or_url: str) -> dict:
    """The manifest of a complete shard set; a set without one is incomplete and refused."""
    where = _join(path_or_url, F.MANIFEST)
    if not _is_url(path_or_url):
        if not os.path.isdir(path_or_url):
            raise UsageError(f"no such shard set folder: {path_or_url}")
        if not os.path.exists(where):
            raise DataError(f"{path_or_url} has no {F.MANIFEST}: the shard set is incomplete "
                            "(precompute did not finish); run precompute again into it")
    try:
        manifest = json.loads(_read_bytes(where))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {where}: {e}") from None
    if manifest.get("format") != F.FORMAT_NAME:
        raise DataError(f"{where} is not a shardtune shard set manifest")
    if manifest.get("format_version") != F.FORMAT_VERSION:
        raise DataError(f"{where} has format version {manifest.get('format_version')}, "
                        f"this shardtune reads version {F.FORMAT_VERSION}; recompute the set")
    return manifest


def shard_urls(path_or_url: str, manifest: dict = None) -> List[str]:
    manifest = manifest or read_manifest(path_or_url)
    return [_join(path_or_url, s["name"]) for s in manifest["shards"]]


def decode_sample(sample: dict) -> dict:
    """webdataset sample (raw bytes per extension) -> tensors + `key` + `meta`."""
    tensors = st_load(sample["safetensors"])
    meta = json.loads(sample["json"])
    return {**tensors, "key": meta["key"], "meta": meta}


def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar shard, in file order, as raw webdataset dicts."""
    import webdataset as wds

    ds = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for sample in ds:
        yield sample


def read_samples(path_or_url: Union[str, List[str]]) -> Iterator[Dict]:
    """Every sample of a shard set (folder or URL), or of one tar / a list of tars, in order."""
    if isinstance(path_or_url, (list, tuple)):
        urls = list(path_or_url)
    elif path_or_url.endswith(".tar"):
        urls = [path_or_url]
    else:
        urls = shard_urls(path_or_url)
    for url in urls:
        for sample in iter_tar(url):
            yield decode_sample(sample)


def read_extras(path_or_url: str) -> Dict[str, torch.Tensor]:
    """Empty-prompt and validation-prompt embeddings; prompts' text is in the manifest."""
    return st_load(_read_bytes(_join(path_or_url, F.EXTRAS)))


def read_rejected(path: str) -> List[dict]:
    p = os.path.join(path, F.REJECTED)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]
