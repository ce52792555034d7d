"""Stage 2: trains without text encoders, loss falls, the LoRA loads in diffusers with the same effect."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import eval_loss

TEXT_ENCODER_MODULES = ("modeling_clip", "modeling_t5", "tokenization_clip", "tokenization_t5")


def train_args(model, shards, out, *extra):
    return [f"model.path={model}", f"data.shards={shards}", f"out.dir={out}", "train.batch_size=2",
            "lora.rank=4", "lora.alpha=8", "validation.steps=2", *extra]


@pytest.fixture(scope="module")
def trained(model_without_text_encoders, shard_set_fp32, tmp_path_factory):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    out = str(tmp_path_factory.mktemp("train"))
    cfg = load_config(TrainConfig, train_args(model_without_text_encoders, shard_set_fp32, out,
                                              "train.max_steps=50", "train.lr=5e-3"))
    return train(cfg)


def test_loss_falls_when_overfitting(trained, shard_set_fp32):
    t = trained["transformer"]
    after = eval_loss(t, shard_set_fp32)
    t.disable_adapters()
    try:
        before = eval_loss(t, shard_set_fp32)
    finally:
        t.enable_adapters()
    assert after < 0.95 * before, (before, after)


def test_outputs_written(trained):
    out = os.path.dirname(trained["lora"])
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 50 and json.loads(lines[-1])["step"] == 50
    assert Image.open(trained["loss_curve"]).size == (800, 400)
    assert Image.open(trained["loss_by_sigma"]).size == (800, 400)
    first = json.loads(lines[0])
    assert len(first["losses"]) == len(first["sigmas"]) == 2  # per-sample losses beside their sigmas
    grid = Image.open(trained["samples"])
    assert grid.size[1] > 128 and grid.size[0] >= 2 * 128  # two validation prompts, 128x128 bucket


def test_lora_file_metadata(trained):
    with safe_open(trained["lora"], "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == adapter["transformer.lora_alpha"] == 4  # alpha / rank is in lora_B
    info = json.loads(meta["shardtune"])
    assert info["rank"] == 4 and info["alpha"] == 8 and info["scale_folded_into_lora_B"] == 2 and info["steps"] == 50
    assert len(info["shard_sets"][0]["manifest_sha256"]) == 64
    assert all(k.startswith("transformer.transformer_blocks.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    # 2 blocks x 8 projections (the last block has no to_add_out: context_pre_only) x A and B.
    assert len(keys) == (8 + 7) * 2


def test_lora_loads_in_diffusers_with_the_trained_effect(trained, tiny_model):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(5)
    probe = dict(hidden_states=torch.randn(1, 16, 16, 16, generator=g), timestep=torch.tensor([700.0]),
                 encoder_hidden_states=torch.randn(1, 154, 128, generator=g),
                 pooled_projections=torch.randn(1, 80, generator=g), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**probe)[0]
        trainer_out = trained["transformer"](**probe)[0]
        kw = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64, output_type="latent")
        base_img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        pipe.load_lora_weights(os.path.dirname(trained["lora"]))
        loaded = pipe.transformer(**probe)[0]
        lora_img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (trainer_out - base).abs().max() > 1e-3  # the LoRA does something...
    assert torch.allclose(loaded, trainer_out, atol=1e-5, rtol=1e-5)  # ...and the same thing in diffusers (alpha/rank = 2)
    assert (lora_img - base_img).abs().max() > 1e-3


def test_refuses_a_shard_set_for_another_model(tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.config import run_cli
    from shards.manifest import Manifest
    from shards.writer import write_manifest
    from train.__main__ import main

    wrong = tmp_path / "wrong"
    shutil.copytree(shard_set_fp32, wrong)
    m = json.load(open(wrong / "manifest.json"))
    m["embeddings"]["prompt_embeds_dim"] = 4096
    write_manifest(str(wrong), Manifest.from_json(m))  # re-sealed: a hand-edited manifest is refused before any model check
    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, str(wrong), str(tmp_path / "out"), "train.max_steps=1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert "prompt embedding width 4096 vs joint_attention_dim 128" in err


@pytest.mark.parametrize("arg, needle", [
    ("lora.rnk=4", "unknown config key 'lora.rnk'"),
    ("train.max_steps=abc", "config key 'train.max_steps'"),
    ("data.shards=/no/such/set", "data.shards': no such folder: /no/such/set"),
    ("lora.targets=[to_q,to_qq]", "lora.targets: to_qq match(es) no linear layer"),
    ("loss.weighting=cos", "config key 'loss.weighting'"),
])
def test_config_errors_are_one_line(arg, needle, tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.config import run_cli
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, shard_set_fp32, str(tmp_path), "train.max_steps=1", arg))
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_non_finite_loss_stops_with_a_clear_message(tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.config import run_cli
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, shard_set_fp32, str(tmp_path), "train.max_steps=20",
                                          "train.lr=1e30", "train.max_grad_norm=1e30", "validation.enabled=false"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite for 5 steps in a row" in err


def test_bf16_weights_autocast_accumulation_and_checkpointing(tiny_model, shard_set_fp32, tmp_path):
    from safetensors.torch import load_file

    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    cfg = load_config(TrainConfig, train_args(tiny_model, shard_set_fp32, str(tmp_path), "train.max_steps=3",
                                              "model.precision=bf16", "train.mixed_precision=bf16",
                                              "train.grad_accum=2", "model.gradient_checkpointing=true",
                                              "validation.enabled=false"))
    r = train(cfg)
    t = r["transformer"]
    assert t.is_gradient_checkpointing
    assert t.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    lora = load_file(r["lora"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    lines = open(r["metrics"]).read().splitlines()
    assert len(json.loads(lines[0])["sigmas"]) == 4  # 2 micro-batches of 2 per step


def test_an_earlier_run_is_not_overwritten_silently(tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.config import run_cli
    from train.__main__ import main

    # A finished run whose checkpoints were deleted: its LoRA is worth keeping (a run stopped before its first
    # checkpoint, with no LoRA, is started again instead).
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"earlier")
    (tmp_path / "notes.md").write_text("mine")
    args = train_args(tiny_model, shard_set_fp32, str(tmp_path), "train.max_steps=1", "validation.enabled=false")
    with pytest.raises(SystemExit) as e:
        run_cli("train", main, args)
    assert e.value.code == 2 and "out.overwrite=true" in capsys.readouterr().err
    run_cli("train", main, args + ["out.overwrite=true"])
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() and (tmp_path / "notes.md").read_text() == "mine"


def test_validation_size_is_checked_before_training(tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.config import run_cli
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, shard_set_fp32, str(tmp_path), "train.max_steps=1",
                                          "validation.height=1024", "validation.width=1024"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "position grid" in err and not (tmp_path / "metrics.jsonl").exists()
