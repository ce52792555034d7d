"""The shard set's manifest and the set's small JSON files: found, read and checked without torch (so that
`python -m shards inspect` starts in a fraction of a second), local or remote."""
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

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
    if manifest.get("format_version") not in F.READABLE_VERSIONS:
        raise DataError(f"{where} has format version {manifest.get('format_version')}, this shardtune reads "
                        f"versions {', '.join(map(str, F.READABLE_VERSIONS))}; recompute the set (or update shardtune)")
    try:
        SampleSpec.from_manifest(manifest)
    except (KeyError, TypeError) as e:
        raise DataError(f"{where} lacks what its samples' shapes are read from ({e!r} in format version "
                        f"{manifest['format_version']}); recompute the set") from None
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


@dataclass(frozen=True)
class SampleSpec:
    """What a set's samples hold and how they are stored, from its manifest.

    The view every reader hands out: `prompt_embeds` [clip_tokens + t5_tokens, width] (CLIP-L and CLIP-G
    hidden states side by side, zero-padded to T5's width, then T5's), `pooled_prompt_embeds` [pooled_dim],
    latents of `latent_channels`. Stored (v2): `clip_embeds` [clip_tokens, clip_dim] without the zero padding,
    `t5_embeds` [t5_tokens, width] unless the set has no T5 (`t5` false: zeros in the view), `latent_std` unless
    `latent_std` is false. v1 stored the view itself."""
    version: int
    clip_tokens: int
    t5_tokens: int
    width: int
    pooled_dim: int
    latent_channels: int
    clip_dim: int  # v1: = width (the padding is stored)
    t5: bool = True
    latent_std: bool = True

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SampleSpec":
        emb = manifest["embeddings"]
        view = dict(clip_tokens=emb["clip_tokens"], t5_tokens=manifest["max_sequence_length"],
                    width=emb["prompt_embeds_dim"], pooled_dim=emb["pooled_dim"],
                    latent_channels=manifest["latent_channels"])
        if manifest.get("format_version", 1) == 1:
            return cls(version=1, clip_dim=emb["prompt_embeds_dim"], **view)
        stored = manifest["stored"]
        return cls(version=manifest["format_version"], clip_dim=stored["clip_dim"], t5=stored["t5"],
                   latent_std=stored["latent_std"], **view)

    def stored_json(self) -> dict:
        """The manifest's `stored` record (v2)."""
        return {"clip_dim": self.clip_dim, "t5": self.t5, "latent_std": self.latent_std}

    def view_shapes(self) -> Dict[str, tuple]:
        return {"prompt_embeds": (self.clip_tokens + self.t5_tokens, self.width),
                "pooled_prompt_embeds": (self.pooled_dim,)}

    def same_view(self, other: "SampleSpec") -> bool:
        """Whether two sets' samples read the same (whatever each stores): sets trained together must."""
        keys = ("clip_tokens", "t5_tokens", "width", "pooled_dim", "latent_channels")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def expected_shapes(manifest: dict) -> Dict[str, tuple]:
    return SampleSpec.from_manifest(manifest).view_shapes()


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


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def combined_manifest(paths: List[str], manifests: List[dict], warn: Callable[[str], None] = _warn) -> dict:
    """One view of several shard sets trained together, which must agree on everything that shapes a sample
    (however each stores it: v1 and v2 sets mix); `warn` hears of what differs harmlessly."""
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        for key in ("latent_channels", "embeddings", "max_sequence_length", "vae"):
            if m[key] != first[key]:
                raise DataError(f"shard sets {paths[0]} and {path} differ in {key} ({first[key]} vs {m[key]}); "
                                "sets trained together must come from the same model and text settings")
        # Same shapes can still hold other embeddings: another text encoder's weights, or none in place of T5.
        a, b = first["model"].get("components", {}), m["model"].get("components", {})
        if a and b and a != b:
            differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            what = ", ".join(f"{k} ({'absent' if k not in a else a[k][:12]} vs {'absent' if k not in b else b[k][:12]})"
                             for k in differ)
            raise DataError(f"shard sets {paths[0]} (model {first['model'].get('path')}) and {path} (model "
                            f"{m['model'].get('path')}) were made with other model components: {what}; sets trained "
                            "together must come from the same text encoders and VAE (text.t5_precision=none leaves "
                            "T5 out): rebuild one with the other's model and text settings")
        precisions = {k: (first.get("precisions", {}).get(k), m.get("precisions", {}).get(k)) for k in ("clip", "t5")}
        if any(x != y for x, y in precisions.values()):
            warn(f"train: warning: shard sets {paths[0]} and {path} were encoded at other precisions "
                 f"({', '.join(f'{k} {x} vs {y}' for k, (x, y) in precisions.items() if x != y)}); their "
                 "embeddings differ slightly")
    buckets = {}
    for m in manifests:
        for b, n in m["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
    return {**first, "buckets": buckets,
            "counts": {"written": sum(m["counts"]["written"] for m in manifests)}}
