"""The shard set's manifest and the set's small JSON files: found, read and checked without torch (so that
`python -m shards inspect` starts in a fraction of a second), local or remote."""
import json
import os
from typing import Dict, List

from . import format as F
from .common.errors import DataError, UsageError


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def open_stream(path: str):
    if is_url(path):
        from webdataset.gopen import gopen
        return gopen(path, "rb")
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    try:
        with open_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; the shard set is damaged: run `python -m shards verify` on it") from None
    except Exception as e:  # a URL stream reports failures as many types with long reprs
        raise DataError(f"cannot read {path} ({type(e).__name__}); check the path or URL and the network") from None


def read_manifest(path_or_url: str) -> dict:
    """The manifest of a complete shard set; a set without one is incomplete and refused."""
    where = join(path_or_url, F.MANIFEST)
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
        manifest = json.loads(read_bytes(where))
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != F.FORMAT_NAME:
        raise DataError(f"{where} is not a shardtune shard set manifest")
    if manifest.get("format_version") != F.FORMAT_VERSION:
        raise DataError(f"{where} has format version {manifest.get('format_version')}, "
                        f"this shardtune reads version {F.FORMAT_VERSION}; recompute the set")
    # Manifests written before the self-hash existed have none and are read as they are.
    if F.MANIFEST_HASH in manifest and manifest[F.MANIFEST_HASH] != F.manifest_digest(manifest):
        raise DataError(f"{where} was edited after it was written (its {F.MANIFEST_HASH} does not match its "
                        "content); rerun precompute to rebuild the set, or run `python -m shards verify` on it")
    return manifest


def set_files(manifest: dict) -> Dict[str, dict]:
    """{name: {"sha256", and "bytes" where known}} of the set's files other than the manifest and its shards.
    A manifest from before `files` existed still has the extras' sha256 in its `extras` record."""
    files = {k: dict(v) for k, v in manifest.get("files", {}).items()}
    extras_sha = manifest.get("extras", {}).get("sha256")
    if F.EXTRAS not in files and extras_sha:
        files[F.EXTRAS] = {"sha256": extras_sha}
    return files


def read_rejected(path: str) -> List[dict]:
    p = os.path.join(path, F.REJECTED)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_shapes(manifest: dict):
    emb = manifest["embeddings"]
    return {
        "prompt_embeds": (emb["clip_tokens"] + manifest["max_sequence_length"], emb["prompt_embeds_dim"]),
        "pooled_prompt_embeds": (emb["pooled_dim"],),
    }


def absent_run_state(path: str, manifest: dict) -> List[str]:
    """Run-state files the manifest lists that this local copy of the set lacks (verify skips them)."""
    if is_url(path):
        return []
    return [n for n in manifest.get("files", {}) if F.is_run_state(n) and not os.path.exists(os.path.join(path, n))]


def unchecked(manifest: dict) -> List[str]:
    """What `verify` cannot check in a set written before the manifest hashed every file and itself."""
    missing = []
    if F.MANIFEST_HASH not in manifest:
        missing.append(f"{F.MANIFEST} itself")
    if "files" not in manifest:
        missing.append(f"{F.REJECTED} and the shard records")
    return missing
