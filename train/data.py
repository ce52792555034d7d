"""Shard stream -> seeded shuffle buffer -> batches that each hold one bucket."""
import random
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Union

import torch

from shards import read_samples
from shards.errors import DataError

TENSORS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")


def collate(samples: List[dict]) -> Dict:
    batch = {name: torch.stack([s[name] for s in samples]) for name in TENSORS}
    if all("latent_mean_flip" in s for s in samples):
        for name in ("latent_mean_flip", "latent_std_flip"):
            batch[name] = torch.stack([s[name] for s in samples])
    batch["keys"] = [s["key"] for s in samples]
    batch["prior"] = [bool(s["meta"].get("prior", False)) for s in samples]
    return batch


def _shuffled(samples: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    pool = []
    for s in samples:
        pool.append(s)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def _all_samples(sets: List[str]) -> Iterator[dict]:
    for path in sets:
        yield from read_samples(path)


def bucket_batches(shards: Union[str, List[str]], batch_size: int, seed: int, shuffle_buffer: int = 256,
                   rank: int = 0, world: int = 1, weights: Optional[List[float]] = None) -> Iterator[Dict]:
    """Every process of a multi-GPU run gets every `world`-th batch of the same seeded stream, so the
    processes see different samples and, together, each sample once per epoch."""
    source = _weighted_batches(shards, weights, batch_size, seed, shuffle_buffer) if weights else \
        _bucket_batches(shards, batch_size, seed, shuffle_buffer)
    for i, batch in enumerate(source):
        if i % world == rank:
            yield batch


def _bucket_batches(shards: Union[str, List[str]], batch_size: int, seed: int, shuffle_buffer: int = 256) -> Iterator[Dict]:
    """Endless batches; epoch e reshuffles with seed + e. A bucket's leftover samples at the end
    of an epoch form a smaller batch rather than being dropped."""
    sets = [shards] if isinstance(shards, str) else list(shards)
    epoch = 0
    while True:
        rng = random.Random(seed * 100003 + epoch)
        pending = defaultdict(list)
        n = 0
        for s in _shuffled(_all_samples(sets), shuffle_buffer, rng):
            n += 1
            bucket = tuple(s["meta"]["bucket"])
            pending[bucket].append(s)
            if len(pending[bucket]) == batch_size:
                yield collate(pending.pop(bucket))
        if n == 0:
            raise DataError(f"shard set {shards} holds no samples")
        for bucket in sorted(pending):
            yield collate(pending[bucket])
        epoch += 1


def _endless(path: str, shuffle_buffer: int, seed: int) -> Iterator[dict]:
    epoch = 0
    while True:
        n = 0
        for s in _shuffled(read_samples(path), shuffle_buffer, random.Random(seed * 100003 + epoch)):
            n += 1
            yield s
        if n == 0:
            raise DataError(f"shard set {path} holds no samples")
        epoch += 1


def _weighted_batches(sets: List[str], weights: List[float], batch_size: int, seed: int,
                      shuffle_buffer: int) -> Iterator[Dict]:
    """Sets mixed by weight: each next sample comes from set i with probability w_i / sum(w); each set
    cycles through its own epochs, so a small set weighted up is simply seen more often."""
    streams = [_endless(p, shuffle_buffer, seed + 7919 * i) for i, p in enumerate(sets)]
    rng = random.Random(seed * 15485863 + 1)
    pending = defaultdict(list)
    while True:
        s = next(streams[rng.choices(range(len(sets)), weights=weights)[0]])
        bucket = tuple(s["meta"]["bucket"])
        pending[bucket].append(s)
        if len(pending[bucket]) == batch_size:
            yield collate(pending.pop(bucket))


class Prefetch:
    """Reads and collates the next batches in a background thread, so the GPU never waits on tar
    reading; pins their memory for asynchronous copies when training on CUDA. Order is unchanged."""

    _END = object()

    def __init__(self, batches: Iterator[Dict], depth: int = 4, pin: bool = False):
        import queue
        import threading

        self._q = queue.Queue(maxsize=depth)
        self._pin = pin
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches):
        try:
            for b in batches:
                if self._pin:
                    b = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                if not self._put(b):
                    return
        except BaseException as e:  # handed to the training loop, which raises it there
            self._put(e)
        self._put(self._END)

    def close(self) -> None:
        """Stop the thread before the interpreter exits (a thread inside torch at exit aborts it)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def __iter__(self):
        return self

    def __next__(self):
        b = self._q.get()
        if b is self._END:
            raise StopIteration
        if isinstance(b, BaseException):
            raise b
        return b
