"""Shard sets -> this process's share -> seeded shuffle buffer -> batches that each hold one bucket.

Each process reads only its own share of every epoch, decided from the manifests before any tar byte is
read (`epoch_plan`): whole shards when every process can get some, otherwise disjoint sample ranges. The
stream's whole state is data (the rest of the epoch's plan, where the buffered samples lie, the RNG
states), so a checkpoint stores a position and a resume starts reading there instead of replaying.

webdataset's `split_by_node` / `split_by_worker` / `shuffle` / `RandomMix` are not used: they split whole
shards round-robin (nothing for a set with fewer shards than processes, no balance by sample count), and
their shuffle buffers and mixers keep no state that can be saved and restored, so resuming them means
replaying the stream from the start.
"""
import random
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from shards import read_manifest
from shards.common.errors import DataError, UsageError
from shards.manifest import Manifest, SampleSpec, join
from shards.samples import write_prompt_embeds
from shards.reader import decode_raw, iter_tar, read_samples_at

TENSORS = ("latent_mean", "pooled_prompt_embeds")

Piece = Tuple[int, int, int]  # (shard index, first sample, end sample): a sample range of one shard


def collate(samples: List[dict]) -> Dict:
    """Samples as read (each with its set's `spec`, text embeddings as stored) -> one batch, prompt_embeds
    built in place (one copy of each part, as stacking copies v1's)."""
    batch = {name: torch.stack([s[name] for s in samples]) for name in TENSORS}
    spec = samples[0]["spec"]
    embeds = torch.empty(len(samples), spec.clip_tokens + spec.t5_tokens, spec.width,
                         dtype=batch["pooled_prompt_embeds"].dtype)
    for row, s in zip(embeds, samples):
        write_prompt_embeds(s["spec"], s, row)
    batch["prompt_embeds"] = embeds
    if all("latent_mean_flip" in s for s in samples):
        batch["latent_mean_flip"] = torch.stack([s["latent_mean_flip"] for s in samples])
    for name, mean in (("latent_std", "latent_mean"), ("latent_std_flip", "latent_mean_flip")):
        if mean in batch and any(name in s for s in samples):
            # A set stored without the std trains on the mean: a zero std gives exactly that, sample by sample,
            # when its samples share a batch with another set's.
            batch[name] = torch.stack([s[name] if name in s else torch.zeros_like(s[mean]) for s in samples])
    batch["keys"] = [s["key"] for s in samples]
    batch["prior"] = [bool(s["meta"].get("prior", False)) for s in samples]
    return batch


@dataclass(frozen=True)
class Shard:
    url: str
    sha256: Optional[str]
    samples: int
    excluded: frozenset  # keys readers skip: later copies of an image found in another shard
    spec: SampleSpec  # how its set stores samples


def set_shards(paths: Sequence[str], manifests: Optional[Sequence[Manifest]] = None) -> List[Shard]:
    """The shards of one or more sets, read as one, from their manifests (no tar is opened)."""
    out = []
    for i, path in enumerate(paths):
        m = manifests[i] if manifests else read_manifest(path)
        excluded, spec = frozenset(m.excluded), m.spec
        out += [Shard(join(path, s.name), s.sha256, s.samples, excluded, spec) for s in m.shards]
    return out


def split_pieces(pieces: Sequence[Piece], rank: int, world: int) -> List[Piece]:
    """Rank's part of the samples of `pieces` taken in order: [rank·T/world, (rank+1)·T/world)."""
    total = sum(b - a for _, a, b in pieces)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, at = [], 0
    for j, a, b in pieces:
        start, end = max(a, a + lo - at), min(b, a + hi - at)
        if start < end:
            out.append((j, start, end))
        at += b - a
    return out


def epoch_plan(shards: Sequence[Shard], seed: int, epoch: int, rank: int, world: int) -> List[Piece]:
    """What process `rank` of `world` reads in `epoch`: the epoch's seeded shard order cut into `world`
    parts of (nearly) equal sample counts. Whole shards when every process gets at least one (a shard goes
    to the part its middle sample falls in); otherwise sample ranges, which may cut shards."""
    order = list(range(len(shards)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    total = sum(shards[j].samples for j in order)
    owner, at = [], 0
    for j in order:
        n = shards[j].samples
        owner.append(min(world - 1, (2 * at + n) * world // max(1, 2 * total)))
        at += n
    if len(set(owner)) == world:
        return [(j, 0, shards[j].samples) for j, r in zip(order, owner) if r == rank]
    return split_pieces([(j, 0, shards[j].samples) for j in order], rank, world)


def _random_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_random_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class SampleStream:
    """Endless samples of one source (a set, or several read as one) for one process: epoch e reads this
    process's `epoch_plan` through a seeded shuffle buffer; a bucket's order is the buffer's draws.

    Every sample carries `loc` = (shard index, sample index, byte offset): where a resume finds it again.
    `stats` counts what was read: bytes of tar data, decoded samples, and the same during `load_state_dict`.
    """

    def __init__(self, shards: List[Shard], seed: int, buffer: int, rank: int = 0, world: int = 1):
        self.shards, self.seed, self.buffer, self.rank, self.world = shards, seed, buffer, rank, world
        excluded = {id(s.excluded): len(s.excluded) for s in shards}  # one set per source set
        usable = sum(s.samples for s in shards) - sum(excluded.values())
        if usable < world:
            raise DataError(f"shard set {self.where} holds {usable} samples, fewer than the {world} processes "
                            "reading it; train with fewer processes or a larger set")
        self.stats = {"bytes": 0, "samples": 0, "resume_bytes": 0, "resume_samples": 0}
        self._start_epoch(0)

    @property
    def where(self) -> str:
        return self.shards[0].url.rsplit("/", 1)[0] if self.shards else "(empty)"

    def _start_epoch(self, epoch: int, plan: Optional[List[Piece]] = None) -> None:
        self.epoch = epoch
        self.plan = deque(plan if plan is not None else epoch_plan(self.shards, self.seed, epoch, self.rank,
                                                                      self.world))
        self.rng = random.Random((self.seed * 1000003 + epoch) * 65537 + self.rank)
        self.pool: List[dict] = []
        self.draining = False
        self.read_in_epoch = 0
        self._reader = None

    def epoch_ended(self) -> bool:
        """True once the epoch's last sample has been handed out (the next one starts a new epoch)."""
        return self.draining and not self.pool

    def __next__(self) -> dict:
        while True:
            if self.draining:
                if self.pool:
                    return self.pool.pop()
                if not self.read_in_epoch:
                    raise DataError(f"shard set {self.where} holds no samples "
                                    f"for process {self.rank} of {self.world}")
                self._start_epoch(self.epoch + 1)
            s = self._read()
            if s is None:
                self.rng.shuffle(self.pool)
                self.draining = True
                continue
            self.pool.append(s)
            if len(self.pool) >= self.buffer:
                return self.pool.pop(self.rng.randrange(len(self.pool)))

    def __iter__(self):
        return self

    def _read(self) -> Optional[dict]:
        while self.plan:
            if self._reader is None:
                self._reader = self._piece(*self.plan[0])
            s = next(self._reader, None)
            if s is not None:
                return s
            self.plan.popleft()
            self._reader = None
        return None

    def _piece(self, j: int, start: int, end: int) -> Iterator[dict]:
        """Samples [start, end) of shard j. The whole shard is read, so its sha256 is checked; the bytes
        outside the range are hashed, not decoded (only a resumed or a cut shard has any)."""
        shard = self.shards[j]
        for k, raw in enumerate(iter_tar(shard.url, shard.sha256, self.stats)):
            if not start <= k < end:
                continue
            self.plan[0] = (j, k + 1, end)  # the position a checkpoint taken after this sample records
            if raw["__key__"] in shard.excluded:
                continue
            s = decode_raw(shard.url, raw, shard.spec, view=False)
            s["spec"] = shard.spec
            s["loc"] = (j, k, raw["__offset__"])
            self.stats["samples"] += 1
            self.read_in_epoch += 1
            yield s

    def _identity(self) -> list:
        return [len(self.shards), sum(s.samples for s in self.shards)]

    def _check_same_source(self, state: dict) -> None:
        if state.get("source") != self._identity():
            raise UsageError("resume: the checkpoint's data position is in other shard sets "
                             f"({state.get('source')} vs {self._identity()} shards and samples); resume with the "
                             "data.shards it was made with, or resume=none")

    def state_dict(self) -> dict:
        return {"source": self._identity(), "epoch": self.epoch, "rank": self.rank, "world": self.world,
                "plan": [list(p) for p in self.plan if p[1] < p[2]],
                "pool": [[*s["loc"], s["key"]] for s in self.pool], "draining": self.draining,
                "read_in_epoch": self.read_in_epoch, "rng": _random_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self._check_same_source(state)
        self._start_epoch(state["epoch"], [tuple(p) for p in state["plan"]])
        self.draining, self.read_in_epoch = state["draining"], state["read_in_epoch"]
        _set_random_state(self.rng, state["rng"])
        self.pool = self.fetch(state["pool"])

    def fetch(self, locs: Sequence[Sequence]) -> List[dict]:
        """Samples by their recorded (shard, index, offset, key), in the order given."""
        read = {"bytes": 0}  # counted apart from the stream's own reading: what the resume itself costs
        by_shard = defaultdict(list)
        for j, _, offset, key in locs:
            by_shard[j].append((offset, key))
        found = {}
        for j, wanted in by_shard.items():
            for offset, s in read_samples_at(self.shards[j].url, wanted, read, self.shards[j].spec, view=False).items():
                s["spec"] = self.shards[j].spec
                found[(j, offset)] = s
        out = []
        for j, k, offset, _ in locs:
            s = dict(found[(j, offset)])
            s["loc"] = (j, k, offset)
            out.append(s)
        self.stats["resume_bytes"] += read["bytes"]
        self.stats["resume_samples"] += len(out)
        return out

    def repartition(self, states: Sequence[dict]) -> None:
        """Take this process's part of what the processes that saved `states` (another number of them)
        had left: their unread pieces (and the rest of the newest epoch, for those still in an older one)
        are cut into equal sample ranges, their buffered samples dealt out in turn. Every sample of the
        epochs in flight is still read exactly once; the next epoch is split among the new processes."""
        for state in states:
            self._check_same_source(state)
        states = sorted(states, key=lambda s: s["rank"])
        newest = max(s["epoch"] for s in states)
        rest = []
        for s in states:
            rest += [tuple(p) for p in s["plan"]]
            for e in range(s["epoch"] + 1, newest + 1):
                rest += epoch_plan(self.shards, self.seed, e, s["rank"], s["world"])
        self._start_epoch(newest, split_pieces(rest, self.rank, self.world))
        pooled = [loc for s in states for loc in s["pool"]]
        self.pool = self.fetch(pooled[self.rank::self.world])
        self.read_in_epoch = len(self.pool) + 1  # a share of an epoch already under way may be empty


class BatchStream:
    """Endless batches of one bucket each from one source, or from several mixed by weight.

    One source: epoch e reshuffles with seed + e, and a bucket's leftover samples at the end of an epoch form
    a smaller batch rather than being dropped. Weighted: each next sample comes from set i with probability
    w_i / sum(w); each set cycles through its own epochs, so a small set weighted up is simply seen more often.
    """

    def __init__(self, sets: Union[str, List[str]], batch_size: int, seed: int, shuffle_buffer: int = 256,
                 rank: int = 0, world: int = 1, weights: Optional[List[float]] = None,
                 manifests: Optional[List[Manifest]] = None):
        sets = [sets] if isinstance(sets, str) else list(sets)
        manifests = manifests or [read_manifest(p) for p in sets]
        if weights:
            self.sources = [SampleStream(set_shards([p], [m]), seed + 7919 * i, shuffle_buffer, rank, world)
                            for i, (p, m) in enumerate(zip(sets, manifests))]
        else:
            self.sources = [SampleStream(set_shards(sets, manifests), seed, shuffle_buffer, rank, world)]
        self.weights, self.batch_size = weights, batch_size
        self.mix = random.Random(seed * 15485863 + 1 + rank)
        self.pending: Dict[tuple, List[Tuple[int, dict]]] = defaultdict(list)
        self.flush: List[tuple] = []
        self._overfull = False

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        while True:
            if self._overfull:  # after a repartition a bucket may hold more than a batch: those go first
                for bucket in sorted(self.pending):
                    if len(self.pending[bucket]) >= self.batch_size:
                        items, rest = self.pending[bucket][:self.batch_size], self.pending[bucket][self.batch_size:]
                        if rest:
                            self.pending[bucket] = rest
                        else:
                            del self.pending[bucket]
                        return self._collate(items)
                self._overfull = False
            if self.flush:
                bucket = self.flush.pop(0)
                if bucket in self.pending:
                    return self._collate(self.pending.pop(bucket))
                continue
            i = self.mix.choices(range(len(self.sources)), weights=self.weights)[0] if self.weights else 0
            s = next(self.sources[i])
            bucket = tuple(s["meta"]["bucket"])
            self.pending[bucket].append((i, s))
            full = self.pending.pop(bucket) if len(self.pending[bucket]) == self.batch_size else None
            if not self.weights and self.sources[0].epoch_ended():
                self.flush = sorted(self.pending)
            if full:
                return self._collate(full)

    @staticmethod
    def _collate(items) -> Dict:
        return collate([s for _, s in items])

    @property
    def stats(self) -> dict:
        total = defaultdict(int)
        for src in self.sources:
            for k, v in src.stats.items():
                total[k] += v
        return dict(total)

    def state_dict(self) -> dict:
        return {"sources": [s.state_dict() for s in self.sources], "mix": _random_state(self.mix),
                "pending": [[list(b), [[i, *s["loc"], s["key"]] for i, s in items]] for b, items in self.pending.items()],
                "flush": [list(b) for b in self.flush]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position this stream (same sets, seed, rank and process count) saved."""
        if len(state["sources"]) != len(self.sources):
            raise UsageError("resume: the checkpoint's data stream mixed another number of shard sets by weight; "
                             "resume with the data.shards it was made with, or resume=none")
        for src, st in zip(self.sources, state["sources"]):
            src.load_state_dict(st)
        _set_random_state(self.mix, state["mix"])
        self._restore_pending(state["pending"], self.sources)
        self.flush = [tuple(b) for b in state["flush"]]

    def repartition(self, states: Sequence[dict]) -> None:
        """Continue from the positions every process of a run with another process count saved."""
        for i, src in enumerate(self.sources):
            src.repartition([st["sources"][i] for st in states])
        items = [[b, item] for st in sorted(states, key=lambda s: s["sources"][0]["rank"])
                 for b, entries in st["pending"] for item in entries]
        mine = items[self.sources[0].rank::self.sources[0].world]
        grouped = defaultdict(list)
        for b, item in mine:
            grouped[tuple(b)].append(item)
        self._restore_pending([[list(b), entries] for b, entries in grouped.items()], self.sources)
        self.flush = []

    def _restore_pending(self, pending, sources) -> None:
        self.pending = defaultdict(list)
        for bucket, entries in pending:
            by_source = defaultdict(list)
            for n, (i, *loc) in enumerate(entries):
                by_source[i].append((n, loc))
            samples = [None] * len(entries)
            for i, items in by_source.items():
                for (n, _), s in zip(items, sources[i].fetch([loc for _, loc in items])):
                    samples[n] = (i, s)
            self.pending[tuple(bucket)] = samples
        self._overfull = True


def bucket_batches(shards: Union[str, List[str]], batch_size: int, seed: int, shuffle_buffer: int = 256,
                   rank: int = 0, world: int = 1, weights: Optional[List[float]] = None) -> Iterator[Dict]:
    """The batches process `rank` of `world` trains on (a `BatchStream`)."""
    return BatchStream(shards, batch_size, seed, shuffle_buffer, rank, world, weights)
