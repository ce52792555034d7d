"""Stage 1's encoding: the pending shards' inputs decoded and cropped in DataLoader workers, VAE- and text-encoded,
and written shard by shard (precompute.run plans which shards and restarts)."""
import random
import time
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from shards.common.errors import DataError
from shards.manifest import SampleSpec
from shards.writer import ShardWriter

from . import tars
from .buckets import make_buckets, nearest_bucket, resize_and_crop
from .config import PrecomputeConfig
from .data import sample_key
from .images import decode_rgb, load_rgb, why_unreadable
from .encoders import TextEncoders, VaeEncoder
from .inputs import Item


def _prepare(item: Item, buckets, cfg: PrecomputeConfig) -> dict:
    """Decode and crop one image (runs in DataLoader workers)."""
    if item.reject:
        return {"item": item, "reject": item.reject}
    try:
        img, digest = decode_rgb(item.data) if item.data is not None else load_rgb(item.path)
    except Exception as e:  # PIL raises many types for corrupt, truncated or foreign files
        return {"item": item, "reject": why_unreadable(e)}
    w, h = img.size
    b = cfg.buckets
    if min(w, h) < b.min_size and not b.upscale:
        return {"item": item, "reject": f"too small: {w}x{h} is under buckets.min_size {b.min_size} "
                                        "(buckets.upscale=true keeps it)"}
    bucket = nearest_bucket(h, w, buckets)
    rng = random.Random(f"{cfg.seed}:{item.source}") if b.crop == "random" else None
    pixels, crop = resize_and_crop(img, bucket, rng)
    meta = {"caption": item.caption, "source": item.source, "original_size": [h, w],
            "crop_top_left": list(crop), "bucket": list(bucket), "sha256": digest, "prior": item.prior}
    item.data = None  # the bytes are not needed past here
    return {"item": item, "pixels": pixels, "meta": meta}


class _Batches(torch.utils.data.IterableDataset):
    """Decoded, cropped batches of each pending shard, then an end marker for it.

    Each worker takes whole shards, so a shard's batches arrive in order, and they are cut from the
    shard's start the same way on every run (never across a shard boundary).

    A streamed input tar that fails part-way is read again from its start, after a "restart" marker
    that tells the consumer to drop what it has of that shard; after the last try a "failed" marker
    takes the place of the end marker, so the shard is never recorded as complete."""

    def __init__(self, plan, todo, buckets, cfg):
        self.plan, self.todo, self.buckets, self.cfg = plan, todo, buckets, cfg

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.todo if info is None else self.todo[info.id::info.num_workers]
        for i in mine:
            for attempt in range(1, tars.STREAM_ATTEMPTS + 1):
                batch, n = [], 0
                try:
                    for item in self.plan.items(i, self.cfg):
                        batch.append({"shard": i, **_prepare(item, self.buckets, self.cfg)})
                        n += 1
                        if len(batch) == self.cfg.batch_size:
                            yield batch
                            batch = []
                except tars.StreamError as e:
                    if attempt == tars.STREAM_ATTEMPTS:
                        yield [{"shard": i, "failed": f"{e} ({attempt} tries)"}]
                        break
                    yield [{"shard": i, "restart": True}]
                    time.sleep(tars.RETRY_DELAY_S * 2 ** (attempt - 1))
                    continue
                if batch:
                    yield batch
                yield [{"shard": i, "end": True, "count": n}]
                break


def _encode_latents(vae: VaeEncoder, ready: List[dict], batch: int, flip: bool) -> None:
    """VAE-encode in same-bucket batches (images of one bucket share a size), in place; the latents go to the
    host (under offload they wait there for their group's captions)."""
    by_bucket: Dict[tuple, List[dict]] = {}
    for r in ready:
        by_bucket.setdefault(tuple(r["meta"]["bucket"]), []).append(r)
    for group in by_bucket.values():
        for k in range(0, len(group), batch):
            chunk = group[k:k + batch]
            pixels = torch.stack([r["pixels"] for r in chunk])
            mean, std = (t.cpu() for t in vae.encode(pixels))
            if flip:
                mean_f, std_f = (t.cpu() for t in vae.encode(pixels.flip(-1)))
            for j, r in enumerate(chunk):
                r["tensors"] = {"latent_mean": mean[j], "latent_std": std[j]}
                del r["pixels"]
                if flip:
                    r["tensors"].update(latent_mean_flip=mean_f[j], latent_std_flip=std_f[j])


def _as_is(batch):
    return batch


def encode_shards(cfg: PrecomputeConfig, plan, todo: List[int], text: TextEncoders, vae: VaeEncoder,
                  spec: SampleSpec, computed: Optional[dict] = None) -> dict:
    """Encode the `todo` shards, stored as `spec` says; each shard's record carries `computed` (numerics and
    part)."""
    buckets = make_buckets(cfg.buckets.resolution, cfg.buckets.step, cfg.buckets.min_aspect, cfg.buckets.max_aspect)
    loader = torch.utils.data.DataLoader(_Batches(plan, todo, buckets, cfg), batch_size=None,
                                         num_workers=min(cfg.num_workers, len(todo)), collate_fn=_as_is)
    counts = [plan.count(i) for i in todo]
    total = None if None in counts else sum(counts)
    writers: Dict[int, ShardWriter] = {}
    seen_in_shard: Dict[int, Dict[str, str]] = {}
    truncated: Dict[int, Dict[str, int]] = {}
    images, t0 = 0, time.time()
    bar = tqdm(total=total, desc="precompute", unit="img", dynamic_ncols=True)
    failed: Dict[int, str] = {}
    in_shard: Dict[int, int] = {}
    # Batches whose latents are done and whose captions wait for the text encoders: one batch at a time when
    # every encoder stays on the device, a group when they take turns (each switch is a host-device copy).
    # Each with the rejects found on reading it, so that records keep the same order either way.
    waiting: List[Tuple[list, List[dict]]] = []
    group = cfg.offload_group if text.residency.idle else 1

    def flush():
        if waiting:
            _encode_text_and_add(waiting, text, writers, truncated)
            waiting.clear()

    try:
        for batch in loader:
            if batch[0].get("end") or batch[0].get("restart") or batch[0].get("failed"):
                flush()  # a shard's samples are all added before it ends or is dropped
            if batch[0].get("end"):
                i = batch[0]["shard"]
                w = writers.pop(i, None) or ShardWriter(cfg.out.dir, i, cfg.out.dtype, spec)  # an empty input tar
                w.finish({**(computed or {}), "inputs": plan.signature(i),
                          "truncated": truncated.pop(i, {"clip": 0, "t5": 0})})
                continue
            if batch[0].get("restart") or batch[0].get("failed"):
                i = batch[0]["shard"]  # what was read of this shard is dropped; it starts again or stays undone
                if i in writers:
                    writers.pop(i).abort()
                seen_in_shard.pop(i, None)
                truncated.pop(i, None)
                images -= in_shard.pop(i, 0)
                if batch[0].get("failed"):
                    failed[i] = batch[0]["failed"]
                continue
            ready, early = [], []
            for r in batch:
                i = r["shard"]
                writers.get(i) or writers.setdefault(i, ShardWriter(cfg.out.dir, i, cfg.out.dtype, spec))
                seen = seen_in_shard.setdefault(i, {})
                if "reject" in r:
                    early.append((i, r["item"].source, r["reject"]))
                elif r["meta"]["sha256"] in seen:
                    early.append((i, r["item"].source, f"duplicate: same content as {seen[r['meta']['sha256']]}"))
                else:
                    seen[r["meta"]["sha256"]] = r["item"].source
                    ready.append(r)
            if ready:
                _encode_latents(vae, ready, cfg.batch_size, cfg.augment.flip)
            waiting.append((early, ready))
            if sum(len(ready) for _, ready in waiting) >= group:
                flush()
            images += len(batch)
            in_shard[batch[0]["shard"]] = in_shard.get(batch[0]["shard"], 0) + len(batch)
            bar.update(len(batch))
        flush()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    if failed:
        i = min(failed)
        others = f" (and {len(failed) - 1} other input tar(s))" if len(failed) > 1 else ""
        raise DataError(f"input tar {plan.urls[i]}{others} could not be read: {failed[i]}; its shard {i} was not "
                        "written: run the same command again to redo only the unfinished shards")
    return {"images": images, "seconds": time.time() - t0}


def _encode_text_and_add(batches: List[Tuple[list, List[dict]]], text: TextEncoders, writers, truncated) -> None:
    """Text-encode the captions of `batches` (their latents are done) and add each sample to its shard, each
    batch after the rejects found on reading it."""
    with_samples = [ready for _, ready in batches if ready]
    results = iter(text.encode_batches([[r["meta"]["caption"] for r in ready] for ready in with_samples])
                   if with_samples else ())
    for early, ready in batches:
        for shard, source, reason in early:
            writers[shard].reject(source, reason)
        if not ready:
            continue
        embeds, pooled = next(results)
        flags = text.truncated([r["meta"]["caption"] for r in ready])
        for j, r in enumerate(ready):
            t = truncated.setdefault(r["shard"], {"clip": 0, "t5": 0})
            t["clip"] += flags[j][0]
            t["t5"] += flags[j][1]
            tensors = {**r["tensors"], "prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]}
            bad = [n for n, x in tensors.items() if not torch.isfinite(x).all()]
            if bad:
                writers[r["shard"]].reject(r["item"].source, f"non-finite values: in {', '.join(bad)} (fp16 overflow?)")
                continue
            writers[r["shard"]].add(sample_key(r["item"].source, r["meta"]["sha256"]), tensors, r["meta"])
