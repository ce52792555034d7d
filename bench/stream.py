"""Shard streaming benchmark (the stream row of `make bench`): samples/s of the trainer's data pipeline on
1024²-sized SD3 samples, against a raw read of the same tar bytes.

The shard set is written with the project's own `ShardSetWriter` (random values in the real shapes
and storage dtype), so the bytes read are exactly what precompute would have produced. The pipeline
timed is the trainer's own: `Prefetch(bucket_batches(...))` over `shards.reader.read_samples` with the
manifest's sha256 checks, collate included.

`python -m bench.stream [--quick]` prints the row; `python -m bench --rows stream` puts it in the table.
"""
import math
import os
import shutil
import tarfile
import tempfile
import time
from typing import List, Optional

import torch

from shards.common.errors import DataError
from shards.format import FORMAT_VERSION
from shards.manifest import Manifest, SampleSpec
from shards.writer import ShardSetWriter, torch_dtype
from train.config import DataConfig
from train.data import bucket_batches
from train.prefetch import Prefetch

from .row import Row
from .stage import rows_cli

RESOLUTION = 1024
DOWNSAMPLE = 8  # SD3 VAE
LATENT_CHANNELS = 16
CLIP_TOKENS = 77
MAX_SEQUENCE_LENGTH = 256  # T5 tokens: prompt_embeds are [77 + 256, 4096]
EMBED_DIM = 4096
POOLED_DIM = 2048
CLIP_DIM = 768 + 1280  # CLIP-L and CLIP-G hidden states side by side; zeros from there to EMBED_DIM


def sample_shapes(resolution: int = RESOLUTION, flip: bool = True,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict:
    side = resolution // DOWNSAMPLE
    latent = (LATENT_CHANNELS, side, side)
    shapes = {"latent_mean": latent, "latent_std": latent,
              "prompt_embeds": (CLIP_TOKENS + max_sequence_length, EMBED_DIM), "pooled_prompt_embeds": (POOLED_DIM,)}
    if flip:
        shapes.update(latent_mean_flip=latent, latent_std_flip=latent)
    return shapes


def write_random_set(out_dir: str, n: int, per_shard: int, dtype: str = "bf16", resolution: int = RESOLUTION,
                     flip: bool = True, max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0,
                     version: int = FORMAT_VERSION) -> Manifest:
    """A complete shard set of `n` random samples in one `resolution`² bucket, in format `version` (the
    current one stores as precompute does); returns its manifest. The CLIP part of prompt_embeds is zero
    beyond CLIP's width, as precompute's is."""
    gen = torch.Generator().manual_seed(seed)
    shapes = sample_shapes(resolution, flip, max_sequence_length)
    spec = None if version == 1 else SampleSpec(
        version=version, clip_tokens=CLIP_TOKENS, t5_tokens=max_sequence_length, width=EMBED_DIM,
        pooled_dim=POOLED_DIM, latent_channels=LATENT_CHANNELS, clip_dim=CLIP_DIM)
    writer = ShardSetWriter(out_dir, dtype=dtype, samples_per_shard=per_shard, overwrite=True, spec=spec)
    try:
        for i in range(n):
            tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
            for name in ("latent_std", "latent_std_flip"):
                if name in tensors:
                    tensors[name] = tensors[name].abs()
            tensors["prompt_embeds"][:CLIP_TOKENS, CLIP_DIM:] = 0
            writer.add(f"bench{i:06d}", tensors,
                       {"caption": f"random sample {i}", "source": f"bench/{i:06d}.png", "sha256": f"{i:064x}",
                        "original_size": [resolution, resolution], "crop_top_left": [0, 0],
                        "bucket": [resolution, resolution]})
        seq = CLIP_TOKENS + max_sequence_length
        writer.write_extras({"empty_prompt_embeds": torch.zeros(seq, EMBED_DIM),
                             "empty_pooled_prompt_embeds": torch.zeros(POOLED_DIM),
                             "validation_prompt_embeds": torch.zeros(1, seq, EMBED_DIM),
                             "validation_pooled_prompt_embeds": torch.zeros(1, POOLED_DIM)},
                            {"validation_prompts": ["random"]})
        return writer.close({
            "model": {"path": "random values (bench.stream)", "revision": None, "components": {}},
            "vae": {"scaling_factor": 1.5305, "shift_factor": 0.0609, "downsample_factor": DOWNSAMPLE},
            "latent_channels": LATENT_CHANNELS,
            "embeddings": {"prompt_embeds_dim": EMBED_DIM, "clip_tokens": CLIP_TOKENS, "pooled_dim": POOLED_DIM},
            "max_sequence_length": max_sequence_length,
            "precisions": {"clip": dtype, "t5": dtype, "vae": dtype},
            "flipped_latents": flip,
            "config": {"bench": "bench.stream", "samples": n, "resolution": resolution},
        })
    except BaseException:
        writer.abort()
        raise


def raw_tar_read(paths: List[str]) -> dict:
    """Every member's bytes of every tar, read as a stream with `tarfile` (no hashing, no decoding)."""
    n_bytes = members = 0
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    n_bytes += len(tar.extractfile(m).read())
                    members += 1
    return {"seconds": time.perf_counter() - t0, "bytes": n_bytes, "members": members}


def pipeline_read(set_dir: str, n: int, batch_size: int, shuffle_buffer: int, seed: int = 0,
                  pin: Optional[bool] = None) -> dict:
    """One epoch through the trainer's stream: Prefetch(bucket_batches(set)) until `n` samples arrived."""
    pin = torch.cuda.is_available() if pin is None else pin  # the trainer pins only when training on CUDA
    keys, batches = [], 0
    t0 = time.perf_counter()
    stream = Prefetch(bucket_batches(set_dir, batch_size, seed, shuffle_buffer), pin=pin)
    try:
        while len(keys) < n:
            batch = next(stream)
            keys += batch["keys"]
            batches += 1
        seconds = time.perf_counter() - t0
    finally:
        stream.close()
    return {"seconds": seconds, "keys": keys, "batches": batches, "last_batch": batch, "pin": pin}


def stream_row(n: int, per_shard: int, batch_size: int = 4, repeats: int = 1, dtype: str = "bf16",
               resolution: int = RESOLUTION, flip: bool = True, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
               shuffle_buffer: Optional[int] = None, workdir: Optional[str] = None,
               version: int = FORMAT_VERSION) -> Row:
    shuffle_buffer = DataConfig.shuffle_buffer if shuffle_buffer is None else shuffle_buffer
    tmp = tempfile.mkdtemp(prefix="shardtune-stream-bench-", dir=workdir)
    try:
        set_dir = os.path.join(tmp, "set")
        manifest = write_random_set(set_dir, n, per_shard, dtype, resolution, flip, max_sequence_length,
                                    version=version)
        tars = [os.path.join(set_dir, s.name) for s in manifest.shards]
        tar_bytes = manifest.shard_bytes
        shapes = sample_shapes(resolution, flip, max_sequence_length)
        tensor_bytes = sum(math.prod(s) for s in shapes.values()) * torch_dtype(dtype).itemsize
        # Alternate the two reads so that both see the same machine state; keep each one's best.
        raws, runs = [], []
        for _ in range(repeats):
            raws.append(raw_tar_read(tars))
            runs.append(pipeline_read(set_dir, n, batch_size, shuffle_buffer))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in runs:
        if sorted(r["keys"]) != sorted(f"bench{i:06d}" for i in range(n)):
            raise DataError(f"the pipeline yielded {len(r['keys'])} samples, not each of the {n} written once")
    for r in raws:
        if r["members"] != 2 * n or r["bytes"] > tar_bytes:
            raise DataError(f"raw read saw {r['members']} members, expected {2 * n}")
    best, raw = min(runs, key=lambda r: r["seconds"]), min(raws, key=lambda r: r["seconds"])
    batch = best["last_batch"]
    for name, shape in shapes.items():
        if tuple(batch[name].shape[1:]) != shape or batch[name].dtype != torch_dtype(dtype):
            raise DataError(f"batch tensor {name} is {tuple(batch[name].shape)} {batch[name].dtype}")
    mb = tar_bytes / 1e6
    return Row(
        row="stream",
        label=f"trainer data pipeline, {resolution}² SD3 samples, format v{version}",
        what="trainer data pipeline (Prefetch + bucket_batches + read_samples with sha256 checks + collate), "
             f"{resolution}² SD3 samples from page-cached shards, CPU",
        settings={"resolution": resolution, "format_version": version, "sample_bytes": tar_bytes // n,
                  "tensor_bytes": tensor_bytes,
                  "dtype": dtype, "samples": n, "shards": len(tars), "batch_size": batch_size,
                  "shuffle_buffer": shuffle_buffer, "flipped_latents": flip,
                  "prompt_embeds": list(shapes["prompt_embeds"]), "latent": list(shapes["latent_mean"]),
                  "pin_memory": best["pin"], "repeats": repeats, "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads()},
        samples_per_s=n / best["seconds"],
        seconds=best["seconds"],
        baseline={"what": "raw tar read (same bytes, tarfile streaming read, no hashing or decoding)",
                  "samples_per_s": n / raw["seconds"], "mb_per_s": mb / raw["seconds"],
                  "seconds": raw["seconds"], "seconds_all": [r["seconds"] for r in raws]},
        ratio=best["seconds"] / raw["seconds"],  # as in every row: measured time / baseline time
        extra={"samples_read": len(best["keys"]), "batches": best["batches"], "mb_per_s": mb / best["seconds"],
               "seconds_all": [r["seconds"] for r in runs]},
    )


def rows(quick: bool = False) -> List[Row]:
    """quick: a few samples, one pass (tests); full: 512 samples (~2.4 GB of shards), best of 5."""
    if quick:
        return [stream_row(n=24, per_shard=8, batch_size=4, repeats=1)]
    return [stream_row(n=512, per_shard=64, batch_size=4, repeats=5)]


def format_row(r: Row) -> str:
    s, b, x = r.settings, r.baseline, r.extra
    return (f"{r.row}: {r.samples_per_s:.1f} samples/s, {x['mb_per_s']:.0f} MB/s "
            f"({x['samples_read']} samples in {r.seconds:.2f} s; runs {', '.join(f'{t:.2f}' for t in x['seconds_all'])} s)\n"
            f"  baseline, {b['what']}: {b['samples_per_s']:.1f} samples/s, {b['mb_per_s']:.0f} MB/s "
            f"(runs {', '.join(f'{t:.2f}' for t in b['seconds_all'])} s)\n"
            f"  pipeline time / raw read time: {r.ratio:.2f}\n"
            f"  settings: {s}")


def main(argv: List[str]) -> None:
    rows_cli(argv, "python -m bench.stream", "Samples/s of the trainer's data pipeline on 1024² SD3 samples, "
             "against a raw read of the same tar bytes.", rows, format_row, "a few samples, one pass (for tests)")


if __name__ == "__main__":
    from shards.common.config import run_cli

    run_cli("bench.stream", main)
