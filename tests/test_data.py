"""The trainer's data stream and objective pieces that do not need a full run."""
import itertools
import os

import pytest

import torch

from train.data import bucket_batches


def test_batches_hold_one_bucket_are_seeded_and_cover_every_sample(shard_set_fp32):
    from shards import read_samples

    buckets = {s["key"]: tuple(s["meta"]["bucket"]) for s in read_samples(shard_set_fp32)}
    first = list(itertools.islice(bucket_batches(shard_set_fp32, 3, seed=1, shuffle_buffer=4), 12))
    again = list(itertools.islice(bucket_batches(shard_set_fp32, 3, seed=1, shuffle_buffer=4), 12))
    other = list(itertools.islice(bucket_batches(shard_set_fp32, 3, seed=2, shuffle_buffer=4), 12))
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    assert [b["keys"] for b in first] != [b["keys"] for b in other]
    for b in first:
        assert len({buckets[k] for k in b["keys"]}) == 1
        assert b["latent_mean"].shape[0] == len(b["keys"]) <= 3
    # Each epoch yields every sample exactly once (leftovers of a bucket form a smaller batch).
    seen, epoch = [], bucket_batches(shard_set_fp32, 3, seed=1, shuffle_buffer=4)
    while len(seen) < len(buckets):
        seen += next(epoch)["keys"]
    assert sorted(seen) == sorted(buckets)


def test_caption_dropout_trains_on_the_empty_prompt(tiny_model, shard_set_fp32):
    from shards import read_extras, read_manifest
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.model import load_transformer, scheduler_config
    from train.objective import Objective

    def objective(dropout):
        cfg = load_config(TrainConfig, [f"model.path={tiny_model}", f"data.shards={shard_set_fp32}", "out.dir=x",
                                        f"loss.caption_dropout={dropout}"])
        return Objective(cfg, read_manifest(shard_set_fp32), read_extras(shard_set_fp32),
                         scheduler_config(tiny_model), torch.device("cpu"), torch.float32)

    t = load_transformer(tiny_model, torch.float32, torch.device("cpu"))
    batch = next(bucket_batches(shard_set_fp32, 2, seed=0))
    extras = read_extras(shard_set_fp32)
    empty_batch = dict(batch, prompt_embeds=extras["empty_prompt_embeds"].expand(2, -1, -1).clone(),
                       pooled_prompt_embeds=extras["empty_pooled_prompt_embeds"].expand(2, -1).clone())
    with torch.no_grad():
        dropped = objective(1.0)(t, dict(batch), 0)[0]
        # Same per-sample draws: the dropout draw comes after the latents, noise and sigma draws.
        reference = objective(0.0)(t, empty_batch, 0)[0]
        kept = objective(0.0)(t, dict(batch), 0)[0]
    assert torch.allclose(dropped, reference)
    assert not torch.allclose(dropped, kept)


def test_each_sample_draws_the_same_wherever_it_trains(tiny_model, shard_set_fp32):
    """A sample's noise, sigma and dropout come from its key and the step: alone, or second in a batch, it gets the
    same loss; at another step, another."""
    from shards import read_extras, read_manifest
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.model import load_transformer, scheduler_config
    from train.objective import Objective

    cfg = load_config(TrainConfig, [f"model.path={tiny_model}", f"data.shards={shard_set_fp32}", "out.dir=x",
                                    "loss.caption_dropout=0.5"])
    objective = Objective(cfg, read_manifest(shard_set_fp32), read_extras(shard_set_fp32),
                          scheduler_config(tiny_model), torch.device("cpu"), torch.float32)
    t = load_transformer(tiny_model, torch.float32, torch.device("cpu"))
    batch = next(bucket_batches(shard_set_fp32, 2, seed=0))

    def part(rows):
        return {k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}

    with torch.no_grad():
        both = objective(t, batch, 7)[2]
        swapped = objective(t, part([1, 0]), 7)[2]
        alone = objective(t, part([1]), 7)[2]
        later = objective(t, part([1]), 8)[2]
    # Close, not equal: a batch of one may take other matrix kernels than a batch of two.
    assert torch.allclose(both.flip(0), swapped, rtol=1e-5) and torch.allclose(alone, both[1:], rtol=1e-5)
    assert not torch.allclose(later, alone, rtol=1e-2)


def test_several_shard_sets_are_read_together(shard_set_fp32, tiny_model, tmp_path):
    import json
    import shutil

    from shards import read_samples
    from shards import read_manifest
    from shards.manifest import Manifest, combined_manifest
    from shards.common.errors import DataError

    from conftest import copy_of_set

    second = str(tmp_path / "second")
    copy_of_set(shard_set_fp32, second, rename=lambda k: f"b{k}")  # the same tensors under other keys
    keys = [s["key"] for s in read_samples(shard_set_fp32)]
    assert len(keys) == 8
    seen = []
    batches = bucket_batches([shard_set_fp32, second], 1, seed=0, shuffle_buffer=1)
    for _ in range(16):
        seen += next(batches)["keys"]
    assert sorted(seen) == sorted(keys + [f"b{k}" for k in keys])  # one epoch = each sample of both sets once
    other = tmp_path / "other"
    shutil.copytree(shard_set_fp32, other)
    m = json.load(open(other / "manifest.json"))
    m["max_sequence_length"] = 256
    with pytest.raises(DataError, match="differ in max_sequence_length"):
        combined_manifest([shard_set_fp32, str(other)], [read_manifest(shard_set_fp32), Manifest.from_json(m)])


def test_torchrun_processes_take_their_own_part(tiny_model, sample_data, tmp_path, monkeypatch):
    from conftest import precompute_cfg
    from precompute.run import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = run(precompute_cfg(tiny_model, sample_data, str(tmp_path), **{"text.t5_precision": "none", "num_workers": 0,
                                                                      "out.samples_per_shard": 3}))
    assert r.manifest is None and (r.progress["part"], r.progress["parts"], r.progress["shards_done_here"]) == (1, 2, 1)  # shards 0..2: part 1 takes shard 1
    assert os.path.exists(tmp_path / "shard-000001.json") and not os.path.exists(tmp_path / "shard-000000.json")


def test_sets_from_other_model_components_are_refused_naming_both(shard_set_fp32, capsys):
    import copy
    import json

    from shards.common.errors import DataError
    from shards.manifest import Manifest, combined_manifest

    first = json.load(open(f"{shard_set_fp32}/manifest.json"))
    assert "text_encoder_3" in first["model"]["components"]
    without_t5 = copy.deepcopy(first)  # as text.t5_precision=none records it: same shapes, no T5 embeddings
    del without_t5["model"]["components"]["text_encoder_3"], without_t5["model"]["components"]["tokenizer_3"]
    other_vae = copy.deepcopy(first)
    other_vae["model"]["path"] = "another/model"
    other_vae["model"]["components"]["vae"] = "0" * 64
    for m, needle in [(without_t5, r"text_encoder_3 \(\w{12} vs absent\)"), (other_vae, r"vae \(\w{12} vs 000000000000\)")]:
        with pytest.raises(DataError, match=needle) as e:
            combined_manifest([shard_set_fp32, "b"], [Manifest.from_json(first), Manifest.from_json(m)])
        assert f"shard sets {shard_set_fp32} (model {first['model']['path']}) and b (model {m['model']['path']})" in str(e.value)
    other_precision = copy.deepcopy(first)
    other_precision["precisions"]["clip"] = "bfloat16"
    both = combined_manifest([shard_set_fp32, "b"], [Manifest.from_json(first), Manifest.from_json(other_precision)])
    assert "encoded at other precisions (clip float32 vs bfloat16)" in capsys.readouterr().err
    assert both.counts.written == 2 * first["counts"]["written"] and len(both.shards) == 2 * len(first["shards"])
    assert both.buckets == {b: 2 * n for b, n in first["buckets"].items()}
