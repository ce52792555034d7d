"""The shard set's manifest and the set's small JSON files: found, read and checked without torch (so that
`python -m shards inspect` starts in a fraction of a second), local or remote."""
import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Callable, Dict, List, Optional

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


def read_manifest(path_or_url: str) -> "Manifest":
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
        raw = json.loads(read_bytes(where))
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e})") from None
    # Manifests written before the self-hash existed have none and are read as they are.
    if isinstance(raw, dict) and F.MANIFEST_HASH in raw and raw[F.MANIFEST_HASH] != F.manifest_digest(raw):
        raise DataError(f"{where} was edited after it was written (its {F.MANIFEST_HASH} does not match its "
                        "content); rerun precompute to rebuild the set, or run `python -m shards verify` on it")
    return Manifest.from_json(raw, where)


def set_files(manifest: "Manifest") -> Dict[str, dict]:
    """{name: {"sha256", and "bytes" where known}} of the set's files other than the manifest and its shards.
    A manifest from before `files` existed still has the extras' sha256 in its `extras` record."""
    files = {k: dict(v) for k, v in (manifest.files or {}).items()}
    if F.EXTRAS not in files and manifest.extras.sha256:
        files[F.EXTRAS] = {"sha256": manifest.extras.sha256}
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


def _record(cls, data, where: str):
    """`cls` built from one JSON object of the manifest; a field missing or unknown is one DataError naming it."""
    if not isinstance(data, dict):
        raise DataError(f"{where} is not a JSON object; recompute the set")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DataError(f"{where} has fields this shardtune does not know ({', '.join(unknown)}): it was written by "
                        "another version of shardtune, or edited; update shardtune or recompute the set")
    missing = [f.name for f in fields(cls) if f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}; recompute the set")
    return cls(**data)


@dataclass(frozen=True)
class ModelFacts:
    path: str
    revision: Optional[str] = None
    components: Dict[str, str] = field(default_factory=dict)  # component folder -> fingerprint of its files


@dataclass(frozen=True)
class VaeFacts:
    scaling_factor: float
    shift_factor: float
    downsample_factor: int  # pixels per latent along each side


@dataclass(frozen=True)
class EmbeddingFacts:
    prompt_embeds_dim: int  # T5's width (the transformer's joint_attention_dim without T5)
    clip_tokens: int
    pooled_dim: int


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Counts:
    seen: int
    written: int  # samples readers see (duplicates excluded)
    rejected: int


@dataclass(frozen=True)
class ExtrasEntry:
    name: str = F.EXTRAS
    sha256: Optional[str] = None
    validation_prompts: List[str] = field(default_factory=list)
    numerics: Optional[dict] = None  # what computed the extras' embeddings


# Top-level fields a manifest may lack: the set's file hashes and self-hash (absent from sets written before
# them), the stored layout (v2 on), numerics and stats (written by precompute only).
_OMITTED_WHEN_NONE = ("stored", "stats", "numerics", "files", F.MANIFEST_HASH)


@dataclass(frozen=True)
class Manifest:
    """A shard set's manifest.json, typed. `from_json` checks every field; `to_json` gives the dict written."""
    format_version: int
    producer: str
    model: ModelFacts
    vae: VaeFacts
    latent_channels: int
    embeddings: EmbeddingFacts
    max_sequence_length: int  # T5 tokens per sample
    precisions: Dict[str, str]  # encoder -> dtype or quantization it ran in
    dtype: str  # of the stored tensors
    buckets: Dict[str, int]  # "HxW" -> samples readers see
    shards: List[ShardEntry]  # combined_manifest: every set's, in order (names are relative to each set)
    counts: Counts
    extras: ExtrasEntry
    config: dict  # the precompute config that made the set
    format: str = F.FORMAT_NAME
    stored: Optional[dict] = None  # v2: SampleSpec.stored_json()
    flipped_latents: bool = False  # samples also hold the latents of the mirrored image
    rejected_reasons: Dict[str, int] = field(default_factory=dict)
    truncated_captions: Dict[str, int] = field(default_factory=dict)  # captions cut at CLIP's / T5's length
    excluded: Dict[str, str] = field(default_factory=dict)  # key -> why readers skip it (a duplicate)
    files: Optional[Dict[str, dict]] = None  # other files of the set -> {"bytes", "sha256"}
    numerics: Optional[List[dict]] = None  # [{"settings", "shards": [index...]}]: what computed which shards
    stats: Optional[dict] = None  # how the precompute run went (time, rates, peak memory)
    manifest_sha256: Optional[str] = None

    @classmethod
    def from_json(cls, data, where: str = F.MANIFEST) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != F.FORMAT_NAME:
            raise DataError(f"{where} is not a shardtune shard set manifest")
        if data.get("format_version") not in F.READABLE_VERSIONS:
            raise DataError(f"{where} has format version {data.get('format_version')}, this shardtune reads "
                            f"versions {', '.join(map(str, F.READABLE_VERSIONS))}; recompute the set (or update "
                            "shardtune)")
        if data["format_version"] >= 2 and not isinstance(data.get("stored"), dict):
            raise DataError(f"{where} lacks what its samples' shapes are read from ('stored' in format version "
                            f"{data['format_version']}); recompute the set")
        parts = {"model": ModelFacts, "vae": VaeFacts, "embeddings": EmbeddingFacts, "counts": Counts,
                 "extras": ExtrasEntry}
        typed = {k: _record(t, data[k], f"{where}: {k}") for k, t in parts.items() if k in data}
        if isinstance(data.get("shards"), list):
            typed["shards"] = [_record(ShardEntry, s, f"{where}: shards[{i}]") for i, s in enumerate(data["shards"])]
        m = _record(cls, {**data, **typed}, where)
        m.spec  # a stored layout that does not fit the shapes is refused here, not at the first sample
        return m

    def to_json(self) -> dict:
        out = asdict(self)
        return {k: v for k, v in out.items() if not (k in _OMITTED_WHEN_NONE and v is None)}

    @cached_property  # read once per sample by verify and the readers; fields never change (frozen)
    def spec(self) -> SampleSpec:
        e = self.embeddings
        view = dict(clip_tokens=e.clip_tokens, t5_tokens=self.max_sequence_length, width=e.prompt_embeds_dim,
                    pooled_dim=e.pooled_dim, latent_channels=self.latent_channels)
        if self.format_version == 1:
            return SampleSpec(version=1, clip_dim=e.prompt_embeds_dim, **view)
        s = self.stored
        try:
            return SampleSpec(version=self.format_version, clip_dim=int(s["clip_dim"]), t5=bool(s["t5"]),
                              latent_std=bool(s["latent_std"]), **view)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{F.MANIFEST}: 'stored' lacks what its samples' shapes are read from ({e!r}); "
                            "recompute the set") from None

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def view_shapes(self) -> Dict[str, tuple]:
        return self.spec.view_shapes()


def absent_run_state(path: str, manifest: Manifest) -> List[str]:
    """Run-state files the manifest lists that this local copy of the set lacks (verify skips them)."""
    if is_url(path):
        return []
    return [n for n in (manifest.files or {}) if F.is_run_state(n) and not os.path.exists(os.path.join(path, n))]


def unchecked(manifest: Manifest) -> List[str]:
    """What `verify` cannot check in a set written before the manifest hashed every file and itself."""
    missing = []
    if manifest.manifest_sha256 is None:
        missing.append(f"{F.MANIFEST} itself")
    if manifest.files is None:
        missing.append(f"{F.REJECTED} and the shard records")
    return missing


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def combined_manifest(paths: List[str], manifests: List[Manifest], warn: Callable[[str], None] = _warn) -> Manifest:
    """One view of several shard sets trained together, which must agree on everything that shapes a sample
    (however each stores it: v1 and v2 sets mix); `warn` hears of what differs harmlessly."""
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        for key in ("latent_channels", "embeddings", "max_sequence_length", "vae"):
            if getattr(m, key) != getattr(first, key):
                raise DataError(f"shard sets {paths[0]} and {path} differ in {key} ({getattr(first, key)} vs "
                                f"{getattr(m, key)}); sets trained together must come from the same model and text "
                                "settings")
        # Same shapes can still hold other embeddings: another text encoder's weights, or none in place of T5.
        a, b = first.model.components, m.model.components
        if a and b and a != b:
            differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            what = ", ".join(f"{k} ({'absent' if k not in a else a[k][:12]} vs {'absent' if k not in b else b[k][:12]})"
                             for k in differ)
            raise DataError(f"shard sets {paths[0]} (model {first.model.path}) and {path} (model {m.model.path}) "
                            f"were made with other model components: {what}; sets trained together must come from "
                            "the same text encoders and VAE (text.t5_precision=none leaves T5 out): rebuild one with "
                            "the other's model and text settings")
        precisions = {k: (first.precisions.get(k), m.precisions.get(k)) for k in ("clip", "t5")}
        if any(x != y for x, y in precisions.values()):
            warn(f"train: warning: shard sets {paths[0]} and {path} were encoded at other precisions "
                 f"({', '.join(f'{k} {x} vs {y}' for k, (x, y) in precisions.items() if x != y)}); their "
                 "embeddings differ slightly")
    buckets = {}
    for m in manifests:
        for b, n in m.buckets.items():
            buckets[b] = buckets.get(b, 0) + n
    counts = Counts(**{k: sum(getattr(m.counts, k) for m in manifests) for k in ("seen", "written", "rejected")})
    return replace(first, buckets=buckets, counts=counts, shards=[s for m in manifests for s in m.shards])
