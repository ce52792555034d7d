"""`python -m shards verify|inspect DIR`: check a shard set end to end, or summarise it."""
import hashlib
import os
from typing import List

from . import format as F
from .fingerprint import file_sha256
from .errors import DataError
from .reader import _decoded, _read_bytes, is_url, _join, read_extras, read_manifest, read_rejected, set_files


def expected_shapes(manifest: dict):
    emb = manifest["embeddings"]
    return {
        "prompt_embeds": (emb["clip_tokens"] + manifest["max_sequence_length"], emb["prompt_embeds_dim"]),
        "pooled_prompt_embeds": (emb["pooled_dim"],),
    }


def verify(path: str, deep: bool = True) -> List[str]:
    """Problems found (empty list = good). `deep` decodes every sample and checks its shapes."""
    problems = []
    manifest = read_manifest(path)
    absent = [f for f in F.MANIFEST_FIELDS if f not in manifest]
    if absent:
        problems.append(f"manifest lacks fields {absent}")
    shapes = expected_shapes(manifest)
    channels = manifest["latent_channels"]
    total = 0
    keys = set()
    excluded = manifest.get("excluded", {})
    for shard in manifest["shards"]:
        url = _join(path, shard["name"])
        if not is_url(path):
            if not os.path.exists(url):
                problems.append(f"{shard['name']}: missing")
                continue
            if os.path.getsize(url) != shard["bytes"]:
                problems.append(f"{shard['name']}: {os.path.getsize(url)} bytes, manifest says {shard['bytes']}")
                continue
            if not deep and file_sha256(url) != shard["sha256"]:
                problems.append(f"{shard['name']}: sha256 differs from the manifest (corrupt or replaced)")
        if not deep:
            continue
        n = 0
        try:
            for s in _decoded(url, shard["sha256"]):
                n += 1
                if s["key"] not in excluded:
                    problems += _sample_problems(shard["name"], s, shapes, channels, manifest, keys)
        except DataError as e:
            problems.append(str(e))
            continue
        if n != shard["samples"]:
            problems.append(f"{shard['name']}: {n} samples, manifest says {shard['samples']}")
        total += n
    if deep and not problems and total - len(excluded) != manifest["counts"]["written"]:
        problems.append(f"{total} samples in shards, manifest counts {manifest['counts']['written']}")
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
    url = _join(path, name)
    if not is_url(path):
        if not os.path.exists(url):
            return [] if F.is_run_state(name) else [f"{name}: missing"]
        if "bytes" in rec and os.path.getsize(url) != rec["bytes"]:
            return [f"{name}: {os.path.getsize(url)} bytes, manifest says {rec['bytes']}"]
        digest = file_sha256(url)
    else:
        try:
            digest = hashlib.sha256(_read_bytes(url)).hexdigest()
        except DataError as e:
            return [] if F.is_run_state(name) else [str(e)]
    if digest != rec["sha256"]:
        return [f"{name}: sha256 differs from the manifest (corrupt or replaced)"]
    return []


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


def _sample_problems(shard: str, s: dict, shapes: dict, channels: int, manifest: dict, keys: set) -> List[str]:
    problems = []
    k = s["key"]
    if k in keys:
        problems.append(f"{shard}: duplicate key {k}")
    keys.add(k)
    for name, shape in shapes.items():
        if tuple(s[name].shape) != shape:
            problems.append(f"{shard}/{k}: {name} shape {tuple(s[name].shape)}, expected {shape}")
    bh, bw = s["meta"]["bucket"]
    f = manifest["vae"]["downsample_factor"]
    for name in ("latent_mean", "latent_std"):
        if tuple(s[name].shape) != (channels, bh // f, bw // f):
            problems.append(f"{shard}/{k}: {name} shape {tuple(s[name].shape)} does not fit bucket {bh}x{bw}")
    missing_meta = [m for m in F.SAMPLE_META if m not in s["meta"]]
    if missing_meta:
        problems.append(f"{shard}/{k}: meta lacks {missing_meta}")
    return problems


def describe_numerics(n: dict) -> str:
    if n is None:
        return "not recorded"
    where = f"{n.get('device')} {n.get('device_name', '')}".strip()
    if "threads" in n:
        where += f" ({n.get('cpu_capability')}, {n['threads']} thread{'s' if n['threads'] != 1 else ''})"
    elif "capability" in n:
        where += f" (sm {n['capability']}, CUDA {n.get('cuda')}, cuDNN {n.get('cudnn')})"
    libs = ", ".join(f"{k} {n[k]}" for k in ("torch", "diffusers", "transformers", "bitsandbytes") if k in n)
    return f"{where}; {libs}"


def _numerics_lines(m: dict) -> List[str]:
    """Which device, libraries and threads computed which shards: parts may have run on other machines."""
    groups = m.get("numerics", [])
    if not groups:
        return []
    if len(groups) == 1:
        lines = [f"numerics    {describe_numerics(groups[0]['settings'])} (all shards)"]
    else:
        lines = [f"numerics    {len(groups)} different settings (float results differ slightly between them):"]
        for g in groups:
            ids = g["shards"]
            lines.append(f"              shards {', '.join(map(str, ids[:8]))}{' ...' if len(ids) > 8 else ''} "
                         f"({len(ids)}): {describe_numerics(g['settings'])}")
    extras = m.get("extras", {}).get("numerics")
    if extras is not None and (len(groups) > 1 or extras != groups[0]["settings"]):
        lines.append(f"              {F.EXTRAS}: {describe_numerics(extras)}")
    return lines


def inspect(path: str) -> str:
    m = read_manifest(path)
    emb = m["embeddings"]
    lines = [
        f"shard set   {path}",
        f"producer    {m['producer']} (format v{m['format_version']})",
        f"model       {m['model']['path']}",
        f"samples     {m['counts']['written']} written, {m['counts']['rejected']} rejected, {m['counts']['seen']} seen",
        f"shards      {len(m['shards'])} ({sum(s['bytes'] for s in m['shards']) / 1e6:.1f} MB, {m['dtype']}, "
        f"{sum(s['bytes'] for s in m['shards']) / max(1, sum(s['samples'] for s in m['shards'])) / 1e3:.1f} kB per sample)",
        f"latents     {m['latent_channels']} channels, scale {m['vae']['scaling_factor']}, shift {m['vae']['shift_factor']}",
        f"text        {emb['clip_tokens']}+{m['max_sequence_length']} tokens x {emb['prompt_embeds_dim']}, pooled {emb['pooled_dim']}",
        "encoders    " + ", ".join(f"{k}={v}" for k, v in m["precisions"].items())
        + (", flipped latents" if m.get("flipped_latents") else ""),
        "buckets     " + ", ".join(f"{b}: {n}" for b, n in m["buckets"].items()),
        f"validation  {len(m['extras'].get('validation_prompts', []))} prompts",
    ]
    older = unchecked(m)
    lines.append("integrity   " + (f"sha256 of {len(m['shards'])} shard(s), {len(m.get('files', {}))} other file(s) "
                                 f"and the manifest" if not older else
                                 f"written before the manifest hashed them: {' and '.join(older)} not covered"))
    lines += _numerics_lines(m)
    st = m.get("stats")
    if st:
        lines.append(f"made in     {st['seconds']} s ({st.get('images_per_second', 0)} images/s encoding, "
                     f"{st.get('seconds_loading_models', 0)} s loading models, peak RSS {st.get('peak_rss_mb')} MB"
                     + (f", peak GPU {st['peak_gpu_mb']} MB" if "peak_gpu_mb" in st else "") + ")")
    if not is_url(path):
        reasons = {}
        for r in read_rejected(path):
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        if reasons:
            lines.append("rejected    " + ", ".join(f"{why}: {n}" for why, n in reasons.items()))
    return "\n".join(lines)
