"""The trainer's data stream at scale: each process reads only its share, resume from a position, re-partition."""
import itertools
import os

import pytest

from conftest import small_set
from shards.common.errors import DataError
from train.data import BatchStream, SampleStream, epoch_plan, set_shards


def _epoch(stream: SampleStream):
    """The keys of the stream's current epoch, to its end."""
    keys = []
    while True:
        keys.append(next(stream)["key"])
        if stream.epoch_ended():
            return keys


def _rchar():
    with open("/proc/thread-self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.parametrize("n, per_shard", [(23, 5), (5, 4), (7, 7)])
def test_each_process_reads_only_its_share_and_the_shares_cover_each_epoch(tmp_path, n, per_shard):
    manifest = small_set(tmp_path / "set", n, per_shard)
    shards = set_shards([str(tmp_path / "set")])
    set_bytes = manifest.shard_bytes
    biggest = max(s.bytes for s in manifest.shards)
    everything = sorted(f"s{i:05d}" for i in range(n))
    for world in (1, 2, 3):
        for epoch in (0, 1):
            seen = []
            for rank in range(world):
                stream = SampleStream(shards, seed=4, buffer=3, rank=rank, world=world)
                if epoch:
                    _epoch(stream)
                before_bytes, before_samples, before = stream.stats["bytes"], stream.stats["samples"], _rchar()
                keys = _epoch(stream)
                read, counted = _rchar() - before, stream.stats["bytes"] - before_bytes
                seen += keys
                # Whole shards, or the shards holding this process's sample range: never the whole set.
                assert counted <= set_bytes / world + biggest, (world, rank)
                assert counted <= read <= counted + biggest  # the kernel's count agrees
                assert stream.stats["samples"] - before_samples == len(keys)
            assert sorted(seen) == everything, (world, epoch)  # each sample exactly once per epoch


def test_plans_use_whole_shards_when_there_are_enough_and_ranges_otherwise(tmp_path):
    small_set(tmp_path / "a", 40, 10)
    shards = set_shards([str(tmp_path / "a")])
    plans = [epoch_plan(shards, 0, 0, r, 2) for r in range(2)]
    assert all(a == 0 and b == 10 for plan in plans for _, a, b in plan) and sum(map(len, plans)) == 4
    assert epoch_plan(shards, 0, 1, 0, 2) != plans[0] or epoch_plan(shards, 0, 2, 0, 2) != plans[0]  # reshuffled
    plans = [epoch_plan(shards, 0, 0, r, 8) for r in range(8)]
    assert [sum(b - a for _, a, b in p) for p in plans] == [5] * 8  # sample ranges inside shards
    with pytest.raises(DataError, match="fewer than the 41 processes"):
        SampleStream(shards, 0, 4, 0, 41)


def test_batches_hold_one_bucket_and_each_process_sees_its_share(tmp_path):
    small_set(tmp_path / "set", 31, 4)
    everything = sorted(f"s{i:05d}" for i in range(31))
    seen = []
    for rank in range(2):
        stream = BatchStream(str(tmp_path / "set"), 3, seed=1, shuffle_buffer=4, rank=rank, world=2)
        share = sum(b - a for _, a, b in epoch_plan(stream.sources[0].shards, 1, 0, rank, 2))
        keys = []
        while len(keys) < share:
            batch = next(stream)
            assert len({k for k in batch["keys"]}) == len(batch["keys"]) <= 3
            assert len({tuple(batch["latent_mean"].shape[2:])}) == 1  # one bucket
            keys += batch["keys"]
        assert len(keys) == share
        seen += keys
    assert sorted(seen) == everything


def _resume_check(path, steps, rank=0, world=1, weights=None, sets=None):
    a = BatchStream(sets or path, 4, seed=3, shuffle_buffer=16, rank=rank, world=world, weights=weights)
    for _ in range(steps):
        next(a)
    state = a.state_dict()
    expected = [next(a)["keys"] for _ in range(40)]
    b = BatchStream(sets or path, 4, seed=3, shuffle_buffer=16, rank=rank, world=world, weights=weights)
    b.load_state_dict(state)
    assert [next(b)["keys"] for _ in range(40)] == expected
    held = sum(len(s["pool"]) for s in state["sources"]) + sum(len(e) for _, e in state["pending"])
    return b.stats, held


def test_resume_reads_what_the_buffers_hold_whatever_the_step(tmp_path):
    small_set(tmp_path / "set", 300, 50)
    path = str(tmp_path / "set")
    early, held_early = _resume_check(path, 10)
    late, held_late = _resume_check(path, 1000)  # 4000 samples: past the 13th epoch
    for stats, held in ((early, held_early), (late, held_late)):
        assert stats["resume_samples"] == held <= 16 + 3 * 3  # the shuffle buffer and the part-filled buckets
    sample_bytes = os.path.getsize(tmp_path / "set" / "shard-000000.tar") / 50
    assert late["resume_bytes"] <= held_late * 2 * sample_bytes
    print(f"\nresume at batch 10: {early['resume_samples']} samples, {early['resume_bytes']} B; "
          f"at batch 1000: {late['resume_samples']} samples, {late['resume_bytes']} B")
    for rank in range(2):
        _resume_check(path, 37, rank=rank, world=2)


def test_weighted_sets_under_two_processes(tmp_path):
    small_set(tmp_path / "a", 40, 10, prefix="a")
    small_set(tmp_path / "b", 12, 4, prefix="b", seed=1)
    sets = [str(tmp_path / "a"), str(tmp_path / "b")]
    shares = {"a": [], "b": []}
    for rank in range(2):
        stream = BatchStream(sets, 1, seed=0, shuffle_buffer=4, rank=rank, world=2, weights=[3.0, 1.0])
        drawn = [next(stream)["keys"][0] for _ in range(2000)]
        assert 0.71 < sum(k[0] == "a" for k in drawn) / 2000 < 0.79
        for i, name in enumerate("ab"):  # this process's share of each set, in that set's first epoch
            size = sum(b - a for _, a, b in epoch_plan(stream.sources[i].shards, 7919 * i, 0, rank, 2))
            first_epoch = [k for k in drawn if k[0] == name][:size]
            assert len(set(first_epoch)) == size
            shares[name].append(set(first_epoch))
        _resume_check(None, 25, rank=rank, world=2, weights=[3.0, 1.0], sets=sets)
    for name, n in (("a", 40), ("b", 12)):
        assert not shares[name][0] & shares[name][1]
        assert shares[name][0] | shares[name][1] == {f"{name}{i:05d}" for i in range(n)}


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3)])
def test_resume_with_another_process_count_repartitions_the_rest(tmp_path, old, new):
    """Every sample of the epochs in flight is read exactly once across the change; then epochs go on."""
    small_set(tmp_path / "set", 29, 4)
    shards = set_shards([str(tmp_path / "set")])
    consumed, states = [], []
    for rank in range(old):
        s = SampleStream(shards, seed=5, buffer=4, rank=rank, world=old)
        for _ in range(9 + 5 * rank):  # the processes stand at different points, one of them in epoch 1
            consumed.append((next(s)["key"]))
        states.append(s.state_dict())
    newest = max(st["epoch"] for st in states)
    for rank in range(new):
        s = SampleStream(shards, seed=5, buffer=4, rank=rank, world=new)
        s.repartition(states)
        assert s.epoch == newest
        while True:
            key = next(s)["key"]
            if s.epoch > newest:
                break
            consumed.append(key)
            if s.epoch_ended():
                break
        nxt = _epoch(s) if s.epoch_ended() else None
        assert nxt is None or len(nxt) <= 29 // new + 4
    counts = {k: consumed.count(k) for k in set(consumed)}
    assert len(counts) == 29 and set(counts.values()) == {newest + 1}, counts


def test_a_changed_shard_set_is_refused_at_resume(tmp_path):
    small_set(tmp_path / "set", 20, 5)
    a = BatchStream(str(tmp_path / "set"), 2, seed=0, shuffle_buffer=6)
    list(itertools.islice(a, 5))
    state = a.state_dict()
    small_set(tmp_path / "set", 20, 5, prefix="x")  # same shapes, other samples
    b = BatchStream(str(tmp_path / "set"), 2, seed=0, shuffle_buffer=6)
    with pytest.raises(DataError, match="changed since the checkpoint"):
        b.load_state_dict(state)


def test_a_stream_position_from_other_sets_is_refused(tmp_path):
    from shards.common.errors import UsageError

    small_set(tmp_path / "a", 20, 5)
    small_set(tmp_path / "b", 30, 5, prefix="b")
    a = BatchStream(str(tmp_path / "a"), 2, seed=0, shuffle_buffer=6)
    list(itertools.islice(a, 3))
    with pytest.raises(UsageError, match="position is in other shard sets"):
        BatchStream(str(tmp_path / "b"), 2, seed=0, shuffle_buffer=6).load_state_dict(a.state_dict())
    with pytest.raises(UsageError, match="mixed another number of shard sets"):
        BatchStream([str(tmp_path / "a"), str(tmp_path / "b")], 2, seed=0, shuffle_buffer=6,
                    weights=[1.0, 1.0]).load_state_dict(a.state_dict())
    other_seed = BatchStream(str(tmp_path / "a"), 2, seed=1, shuffle_buffer=6)  # allowed: later epochs differ
    other_seed.load_state_dict(a.state_dict())
    assert next(other_seed)["keys"] == next(a)["keys"]
