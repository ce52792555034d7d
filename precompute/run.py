"""Stage 1 driver: dataset -> encoders -> shard set."""
import os
import time
from collections import Counter
from typing import List

import torch
from tqdm import tqdm

from shards import ShardSetWriter
from shards.writer import check_writable
from shards.config import resolve_device, to_dict
from shards.errors import DataError
from shards.fingerprint import folder_fingerprint
from shards.modelpath import resolve_model

from .buckets import make_buckets, nearest_bucket, resize_and_crop
from .config import PrecomputeConfig
from .data import Item, load_rgb, sample_key, scan_folder, why_unreadable
from .encoders import TextEncoders, VaeEncoder, resolve_dtype

# What precompute reads from a pipeline folder: never the transformer weights.
MODEL_FILES = ["model_index.json", "text_encoder*/*", "tokenizer*/*", "vae/*", "transformer/config.json",
               "scheduler/*"]


def _prepare(item: Item, buckets):
    """Decode and crop one image; returns None plus the reason when it cannot be used."""
    try:
        img, digest = load_rgb(item.path)
    except Exception as e:  # PIL raises many types for corrupt, truncated or foreign files
        return None, why_unreadable(e)
    item.sha256 = digest
    w, h = img.size
    bucket = nearest_bucket(h, w, buckets)
    pixels, crop = resize_and_crop(img, bucket)
    meta = {"caption": item.caption, "source": item.source, "original_size": [h, w],
            "crop_top_left": list(crop), "bucket": list(bucket), "sha256": digest}
    return (pixels, meta), None


def _batches(seq: List, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def run(cfg: PrecomputeConfig) -> dict:
    t0 = time.time()
    device = resolve_device("device", cfg.device)
    root = resolve_model(cfg.model.path, MODEL_FILES, cfg.model.revision)
    items, early_rejects = scan_folder(cfg.data)
    buckets = make_buckets(cfg.buckets.resolution, cfg.buckets.step, cfg.buckets.min_aspect, cfg.buckets.max_aspect)

    check_writable(cfg.out.dir, cfg.out.overwrite)
    clip_dtype = resolve_dtype(cfg.text.clip_precision, device)
    vae_dtype = resolve_dtype(cfg.vae.precision, device)
    text = TextEncoders(root, cfg.text.t5_precision, clip_dtype, device, cfg.text.max_sequence_length)
    vae = VaeEncoder(root, vae_dtype, device)

    writer = ShardSetWriter(cfg.out.dir, cfg.out.dtype, cfg.out.samples_per_shard, cfg.out.overwrite)
    for source, reason in early_rejects:
        writer.reject(source, reason)

    seen_hashes = {}
    truncated = Counter()
    reasons = Counter(reason.split(":")[0] for _, reason in early_rejects)
    bar = tqdm(total=len(items), desc="precompute", unit="img", dynamic_ncols=True)
    try:
        for chunk in _batches(items, cfg.batch_size):
            ready = []
            for item in chunk:
                prepared, why = _prepare(item, buckets)
                if prepared is None:
                    writer.reject(item.source, why)
                    reasons[why.split(":")[0]] += 1
                elif item.sha256 in seen_hashes:
                    why = f"duplicate: same content as {seen_hashes[item.sha256]}"
                    writer.reject(item.source, why)
                    reasons["duplicate"] += 1
                else:
                    seen_hashes[item.sha256] = item.source
                    ready.append((item, *prepared))
            if ready:
                captions = [it.caption for it, _, _ in ready]
                truncated.update(text.truncated(captions))
                embeds, pooled = text.encode(captions)
                for j, (item, pixels, meta) in enumerate(ready):
                    mean, std = vae.encode(pixels[None])
                    tensors = {"latent_mean": mean[0], "latent_std": std[0],
                               "prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]}
                    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
                    if bad:
                        writer.reject(item.source, f"non-finite values: in {', '.join(bad)} (fp16 overflow?)")
                        reasons["non-finite values"] += 1
                        continue
                    writer.add(sample_key(item.source, item.sha256), tensors, meta)
            bar.update(len(chunk))
        bar.close()
        if writer.written == 0:
            writer.finish_rejects()
            raise DataError(f"no usable images in {cfg.data.path} ({writer.rejected} rejected: "
                            + ", ".join(f"{r}: {n}" for r, n in reasons.items()) + "); reasons are in "
                            + os.path.join(cfg.out.dir, "rejected.jsonl"))

        prompts = list(cfg.validation.prompts)
        empty_embeds, empty_pooled = text.encode([""])
        if prompts:
            val_embeds, val_pooled = text.encode(prompts)
        else:
            val_embeds, val_pooled = empty_embeds[:0], empty_pooled[:0]
        writer.write_extras(
            {"empty_prompt_embeds": empty_embeds[0], "empty_pooled_prompt_embeds": empty_pooled[0],
             "validation_prompt_embeds": val_embeds, "validation_pooled_prompt_embeds": val_pooled},
            {"validation_prompts": prompts},
        )
        used = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]
        if text.t5 is not None:
            used += ["text_encoder_3", "tokenizer_3"]
        components = {n: folder_fingerprint(os.path.join(root, n)) for n in used}
        seconds = time.time() - t0
        manifest = writer.close({
            "model": {"path": cfg.model.path, "revision": cfg.model.revision, "components": components},
            "vae": {"scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
                    "downsample_factor": vae.downsample_factor},
            "latent_channels": vae.latent_channels,
            "embeddings": {"prompt_embeds_dim": text.width, "clip_tokens": text.clip_tokens,
                           "pooled_dim": text.pooled_dim},
            "max_sequence_length": cfg.text.max_sequence_length,
            "precisions": {"clip": str(clip_dtype).replace("torch.", ""), "t5": cfg.text.t5_precision,
                           "vae": str(vae_dtype).replace("torch.", "")},
            "truncated_captions": dict(truncated),
            "rejected_reasons": dict(reasons),
            "stats": {"seconds": round(seconds, 2), "images_per_second": round(len(items) / max(seconds, 1e-9), 3)},
            "config": to_dict(cfg),
        }, seen=len(items) + len(early_rejects))
    except BaseException:
        bar.close()
        writer.abort()
        raise
    return manifest


def summary(manifest: dict, out_dir: str) -> str:
    c = manifest["counts"]
    lines = [f"shard set: {out_dir}  ({c['written']} samples in {len(manifest['shards'])} shard(s), "
             f"{c['rejected']} rejected of {c['seen']} seen, {manifest['stats']['seconds']} s)"]
    if manifest["rejected_reasons"]:
        lines.append("  rejected: " + ", ".join(f"{r}: {n}" for r, n in manifest["rejected_reasons"].items())
                     + f"  (details in {os.path.join(out_dir, 'rejected.jsonl')})")
    t = manifest["truncated_captions"]
    if t.get("clip") or t.get("t5"):
        lines.append(f"  truncated captions: {t.get('clip', 0)} longer than CLIP's {manifest['embeddings']['clip_tokens']} "
                     f"tokens, {t.get('t5', 0)} longer than max_sequence_length {manifest['max_sequence_length']}")
    return "\n".join(lines)
