"""`python -m shards inspect PATH`: what a shard set holds, from its manifest and rejected.jsonl (no torch)."""
from typing import List

from . import format as F
from .manifest import Manifest, SampleSpec, is_url, read_manifest, read_rejected, unchecked


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


def _numerics_lines(m: Manifest) -> List[str]:
    """Which device, libraries and threads computed which shards: parts may have run on other machines."""
    groups = m.numerics or []
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
    extras = m.extras.numerics
    if extras is not None and (len(groups) > 1 or extras != groups[0]["settings"]):
        lines.append(f"              {F.EXTRAS}: {describe_numerics(extras)}")
    return lines


def _stored(spec: SampleSpec) -> str:
    if spec.version == 1:
        return f"prompt_embeds {spec.clip_tokens + spec.t5_tokens}x{spec.width} as read, latent mean and std (format v1)"
    t5 = f"T5 {spec.t5_tokens}x{spec.width}" if spec.t5 else "no T5 (zeros when read)"
    std = "latent mean and std" if spec.latent_std else "latent mean only (training uses the mean)"
    return f"CLIP {spec.clip_tokens}x{spec.clip_dim}, {t5}, {std}"


def inspect(path: str) -> str:
    m = read_manifest(path)
    emb, c = m.embeddings, m.counts
    lines = [
        f"shard set   {path}",
        f"producer    {m.producer} (format v{m.format_version})",
        f"model       {m.model.path}",
        f"samples     {c.written} written, {c.rejected} rejected, {c.seen} seen",
        f"shards      {len(m.shards)} ({m.shard_bytes / 1e6:.1f} MB, {m.dtype}, "
        f"{m.shard_bytes / max(1, sum(s.samples for s in m.shards)) / 1e3:.1f} kB per sample)",
        f"latents     {m.latent_channels} channels, scale {m.vae.scaling_factor}, shift {m.vae.shift_factor}",
        f"text        {emb.clip_tokens}+{m.max_sequence_length} tokens x {emb.prompt_embeds_dim}, pooled {emb.pooled_dim}",
        "stored      " + _stored(m.spec),
        "encoders    " + ", ".join(f"{k}={v}" for k, v in m.precisions.items())
        + (", flipped latents" if m.flipped_latents else ""),
        "buckets     " + ", ".join(f"{b}: {n}" for b, n in m.buckets.items()),
        f"validation  {len(m.extras.validation_prompts)} prompts",
    ]
    older = unchecked(m)
    lines.append("integrity   " + (f"sha256 of {len(m.shards)} shard(s), {len(m.files or {})} other file(s) "
                                 f"and the manifest" if not older else
                                 f"written before the manifest hashed them: {' and '.join(older)} not covered"))
    lines += _numerics_lines(m)
    st = m.stats
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
