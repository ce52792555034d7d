"""`python -m shards verify DIR`: check a shard set end to end."""
import hashlib
import os
from typing import List

from . import format as F
from .common.fingerprint import file_sha256
from .common.errors import DataError
from .manifest import Manifest, is_url, join, read_bytes, read_manifest, set_files
from .reader import _decoded, read_extras


def verify(path: str, deep: bool = True) -> List[str]:
    """Problems found (empty list = good). `deep` decodes every sample and checks its shapes."""
    problems = []
    manifest = read_manifest(path)
    spec = manifest.spec
    shapes = spec.view_shapes()
    total = 0
    keys = set()
    excluded = manifest.excluded
    for shard in manifest.shards:
        url = join(path, shard.name)
        if not is_url(path):
            if not os.path.exists(url):
                problems.append(f"{shard.name}: missing")
                continue
            if os.path.getsize(url) != shard.bytes:
                problems.append(f"{shard.name}: {os.path.getsize(url)} bytes, manifest says {shard.bytes}")
                continue
            if not deep and file_sha256(url) != shard.sha256:
                problems.append(f"{shard.name}: sha256 differs from the manifest (corrupt or replaced)")
        if not deep:
            continue
        n = 0
        try:
            for s in _decoded(url, shard.sha256, spec):
                n += 1
                if s["key"] not in excluded:
                    problems += _sample_problems(shard.name, s, shapes, manifest, keys)
        except DataError as e:
            problems.append(str(e))
            continue
        if n != shard.samples:
            problems.append(f"{shard.name}: {n} samples, manifest says {shard.samples}")
        total += n
    if deep and not problems and total - len(excluded) != manifest.counts.written:
        problems.append(f"{total} samples in shards, manifest counts {manifest.counts.written}")
    files = set_files(manifest)
    for name, rec in sorted(files.items()):
        problems += _file_problems(path, name, rec)
    if any(p.startswith(F.EXTRAS + ":") for p in problems):
        return problems  # its tensors would only repeat what is wrong with it
    try:
        extras = read_extras(path, manifest)
    except DataError as e:
        return problems + [str(e)]
    for name in F.EXTRAS_TENSORS:
        if name not in extras:
            problems.append(f"{F.EXTRAS} lacks {name}")
    return problems


def _file_problems(path: str, name: str, rec: dict) -> List[str]:
    url = join(path, name)
    if not is_url(path):
        if not os.path.exists(url):
            return [] if F.is_run_state(name) else [f"{name}: missing"]
        if "bytes" in rec and os.path.getsize(url) != rec["bytes"]:
            return [f"{name}: {os.path.getsize(url)} bytes, manifest says {rec['bytes']}"]
        digest = file_sha256(url)
    else:
        try:
            digest = hashlib.sha256(read_bytes(url)).hexdigest()
        except DataError as e:
            return [] if F.is_run_state(name) else [str(e)]
    if digest != rec["sha256"]:
        return [f"{name}: sha256 differs from the manifest (corrupt or replaced)"]
    return []


def _sample_problems(shard: str, s: dict, shapes: dict, manifest: Manifest, keys: set) -> List[str]:
    problems, spec, channels = [], manifest.spec, manifest.latent_channels
    k = s["key"]
    if k in keys:
        problems.append(f"{shard}: duplicate key {k}")
    keys.add(k)
    for name, shape in shapes.items():
        if tuple(s[name].shape) != shape:
            problems.append(f"{shard}/{k}: {name} shape {tuple(s[name].shape)}, expected {shape}")
    bh, bw = s["meta"]["bucket"]
    f = manifest.vae.downsample_factor
    stored = [n for n in F.SAMPLE_TENSORS + F.OPTIONAL_TENSORS if n.startswith("latent") and n in s]
    if "latent_mean" not in s or ("latent_std" in s) != spec.latent_std:
        problems.append(f"{shard}/{k}: latents {stored} do not fit the set (latent std stored: {spec.latent_std})")
    for name in stored:
        if tuple(s[name].shape) != (channels, bh // f, bw // f):
            problems.append(f"{shard}/{k}: {name} shape {tuple(s[name].shape)} does not fit bucket {bh}x{bw}")
    missing_meta = [m for m in F.SAMPLE_META if m not in s["meta"]]
    if missing_meta:
        problems.append(f"{shard}/{k}: meta lacks {missing_meta}")
    return problems
