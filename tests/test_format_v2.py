"""Shard format v2: text embeddings at their own widths, the latent std optional; v1 sets still read, and the
same inputs train to the same bytes from either."""
import os

import pytest
import torch
from safetensors.torch import load_file

from shards import read_manifest, read_samples
from shards.manifest import SampleSpec
from shards.reader import load_tensors
from shards.samples import pack, unpack
from shards.writer import encode_sample

from conftest import copy_of_set

SPEC = SampleSpec(version=2, clip_tokens=3, t5_tokens=4, width=8, pooled_dim=5, latent_channels=2, clip_dim=6)


def _view(t5: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(7, 8, generator=g)
    embeds[:3, 6:] = 0  # CLIP's part is zero beyond its width, as precompute pads it
    if not t5:
        embeds[3:] = 0
    latent = (2, 4, 4)
    return {"latent_mean": torch.randn(latent, generator=g), "latent_std": torch.rand(latent, generator=g),
            "prompt_embeds": embeds, "pooled_prompt_embeds": torch.randn(5, generator=g)}


@pytest.mark.parametrize("t5,latent_std", [(True, True), (False, True), (True, False)])
def test_stored_and_read_back_bit_for_bit(t5, latent_std):
    spec = SampleSpec(**{**SPEC.__dict__, "t5": t5, "latent_std": latent_std})
    view = _view(t5)
    stored = pack(spec, view)
    assert tuple(stored["clip_embeds"].shape) == (3, 6) and ("t5_embeds" in stored) == t5
    assert "prompt_embeds" not in stored and ("latent_std" in stored) == latent_std
    back = unpack(spec, load_tensors(encode_sample(stored, torch.bfloat16)))
    expected = {k: v.to(torch.bfloat16) for k, v in view.items() if latent_std or k != "latent_std"}
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k  # v1 stored exactly this view
    assert sum(t.numel() for t in stored.values()) < sum(t.numel() for t in view.values())


def test_what_the_layout_would_lose_is_refused():
    view = _view()
    view["prompt_embeds"][0, 7] = 1.0  # a CLIP value beyond clip_dim
    with pytest.raises(ValueError, match="beyond the set's clip_dim 6"):
        pack(SPEC, view)
    with pytest.raises(ValueError, match="stored without T5"):
        pack(SampleSpec(**{**SPEC.__dict__, "t5": False}), _view(t5=True))
    stored = pack(SPEC, _view())
    with pytest.raises(ValueError, match="clip_embeds has shape"):
        unpack(SPEC, {**stored, "clip_embeds": stored["clip_embeds"][:1]})  # would broadcast over 3 rows
    with pytest.raises(ValueError, match="t5_embeds is missing"):
        unpack(SPEC, {k: v for k, v in stored.items() if k != "t5_embeds"})


def test_a_v1_set_reads_and_trains_exactly_as_the_v2_set_of_the_same_inputs(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    m2 = read_manifest(shard_set_fp32)
    assert m2.format_version == 2 and m2.stored == {"clip_dim": 80, "t5": True, "latent_std": True}  # CLIP-L 32 + CLIP-G 48 of T5's 128
    m1 = copy_of_set(shard_set_fp32, str(tmp_path / "v1"), spec=None)
    assert m1.format_version == 1 and m1.stored is None and "stored" not in m1.to_json()
    a, b = list(read_samples(shard_set_fp32)), list(read_samples(str(tmp_path / "v1")))
    assert [s["key"] for s in a] == [s["key"] for s in b] and len(a) == 8
    for x, y in zip(a, b):
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(x[name], y[name]), name
    assert m2.shard_bytes < m1.shard_bytes
    loras = []
    for name, shards in (("v2", shard_set_fp32), ("v1", str(tmp_path / "v1"))):
        out = str(tmp_path / f"train-{name}")
        train(load_config(TrainConfig, [f"model.path={tiny_model}", f"data.shards={shards}", f"out.dir={out}",
                                        "train.batch_size=2", "lora.rank=4", "train.max_steps=4",
                                        "validation.enabled=false"]))
        loras.append(load_file(os.path.join(out, "pytorch_lora_weights.safetensors")))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


def test_without_the_latent_std_training_uses_the_mean(tiny_model, sample_data, tmp_path):
    """out.latent_std=false: the std is not stored, a sample is smaller, and the trainer takes the posterior
    mean as the latent (the same generator draws as with a std, so the rest of the run's randomness holds)."""
    from conftest import precompute_cfg
    from precompute.run import run
    from train import flow

    common = {"text.t5_precision": "none", "num_workers": 0, "out.samples_per_shard": 4}
    with_std = run(precompute_cfg(tiny_model, sample_data, str(tmp_path / "std"), **common)).manifest
    without = run(precompute_cfg(tiny_model, sample_data, str(tmp_path / "mean"), **common,
                                 **{"out.latent_std": "false"})).manifest
    assert without.stored == {"clip_dim": 80, "t5": False, "latent_std": False}
    assert without.shard_bytes < with_std.shard_bytes
    a, b = list(read_samples(str(tmp_path / "std"))), list(read_samples(str(tmp_path / "mean")))
    assert all("latent_std" not in s and torch.equal(s["latent_mean"], t["latent_mean"]) for s, t in zip(b, a))
    assert all(not s["prompt_embeds"][77:].any() for s in b)  # no T5: zeros in the view, nothing stored
    mean = b[0]["latent_mean"][None]
    z = flow.model_latents(mean, None, torch.randn(mean.shape), 0.1, 1.5)  # the drawn eps goes unused
    assert torch.equal(z, (mean.float() - 0.1) * 1.5)


def test_a_batch_mixing_sets_with_and_without_the_std_keeps_each_samples_own():
    """A set stored without the std trains on the mean; in a batch shared with another set's samples, a zero
    std gives exactly that for its samples while the others keep theirs."""
    from train.data import collate

    no_std = SampleSpec(**{**SPEC.__dict__, "latent_std": False})
    a = {**pack(SPEC, _view(seed=1)), "spec": SPEC, "key": "a", "meta": {}}
    b = {**pack(no_std, _view(seed=2)), "spec": no_std, "key": "b", "meta": {}}
    batch = collate([a, b])
    assert torch.equal(batch["latent_std"][0], a["latent_std"]) and not batch["latent_std"][1].any()
    assert torch.equal(batch["prompt_embeds"][0], _view(seed=1)["prompt_embeds"])
    assert "latent_std" not in collate([b, b])


def test_a_v1_sample_of_the_wrong_shape_is_refused_not_broadcast():
    from shards.samples import check_stored

    v1 = SampleSpec(**{**SPEC.__dict__, "version": 1, "clip_dim": 8})
    check_stored(v1, {"prompt_embeds": torch.zeros(7, 8)})
    with pytest.raises(ValueError, match=r"prompt_embeds is \(8,\), the manifest says \(7, 8\)"):
        check_stored(v1, {"prompt_embeds": torch.zeros(8)})  # would broadcast over a batch row
    with pytest.raises(ValueError, match="clip_embeds is missing"):
        unpack(SPEC, _view())  # a v2 set's sample holding v1's tensor
