"""train.mode=full: the transformer's own weights train (all, or chosen blocks and patterns), bf16 weights take
their updates by stochastic rounding, checkpoints hold only what trains and resume exactly, and the run writes a
diffusers transformer folder (and its EMA) that from_pretrained loads to exactly the trained weights."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from shards.common.errors import UsageError


def _args(model, shards, out, *extra):
    return [f"model.path={model}", f"data.shards={shards}", f"out.dir={out}", "train.mode=full", "train.batch_size=2",
            "validation.enabled=false", "train.lr=1e-3", *extra]


def _train(*argv):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    return train(load_config(TrainConfig, list(argv)))


def _base(tiny_model):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer"))


def test_full_mode_trains_what_blocks_and_include_choose(tiny_model):
    from train.config import FullConfig
    from train.full import trained_names

    t = _base(tiny_model)
    every = [n for n, _ in t.named_parameters()]
    assert trained_names(t, FullConfig()) == every
    one = trained_names(t, FullConfig(blocks=[1]))
    assert one and all(n.startswith("transformer_blocks.1.") for n in one)
    assert len(one) == sum(1 for n in every if n.startswith("transformer_blocks.1."))
    mixed = trained_names(t, FullConfig(blocks=[0], include=["norm_out", "pos_embed.*"]))
    assert {n.split(".")[0] for n in mixed} == {"transformer_blocks", "norm_out", "pos_embed"}
    assert not [n for n in mixed if n.startswith("transformer_blocks.1.")]
    assert trained_names(t, FullConfig(include=["context_embedder"])) == ["context_embedder.weight",
                                                                          "context_embedder.bias"]
    with pytest.raises(UsageError, match=r"full.include: 'norm_final' matches no weight.*top-level modules are "
                                         r"context_embedder, norm_out, pos_embed"):
        trained_names(t, FullConfig(include=["norm_final"]))
    with pytest.raises(UsageError, match=r"full.blocks: \[5\] outside 0..1"):
        trained_names(t, FullConfig(blocks=[5]))
    with pytest.raises(UsageError, match="no weight would train"):
        trained_names(t, FullConfig(blocks=[]))


def test_full_mode_refuses_a_quantized_base(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.config import load_config
    from train.config import TrainConfig

    with pytest.raises(UsageError, match="model.quantize.*nf4 weights cannot train in train.mode=full"):
        load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path, "model.quantize=nf4"))


def test_a_partial_run_trains_its_blocks_only_and_writes_a_transformer_folder(tiny_model, shard_set_fp32, tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "run"
    r = _train(*_args(tiny_model, shard_set_fp32, out, "train.max_steps=6", "checkpoint.every=3",
                      "full.blocks=[1]", "full.include=[norm_out]", "train.ema=0.5"))
    trained = r["transformer"]
    base = dict(_base(tiny_model).named_parameters())
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, base[n])}
    chosen = {n for n, _ in trained.named_parameters() if n.startswith(("transformer_blocks.1.", "norm_out."))}
    assert moved and moved <= chosen  # nothing outside the chosen weights changed
    assert len(moved) > len(chosen) // 2
    # The folder loads to exactly the trained weights; its info names the run's choice.
    assert r["transformer_dir"] == str(out / "transformer")
    loaded = SD3Transformer2DModel.from_pretrained(r["transformer_dir"])
    assert all(torch.equal(p, dict(trained.named_parameters())[n]) for n, p in loaded.named_parameters())
    info = json.load(open(out / "transformer" / "shardtune.json"))
    assert info["mode"] == "full" and set(info["trained"]) == chosen and info["steps"] == 6
    assert info["base_fingerprint"] and "rank" not in info
    ema = SD3Transformer2DModel.from_pretrained(str(out / "transformer_ema"))
    ema_moved = [n for n, p in ema.named_parameters() if not torch.equal(p, base[n])]
    assert set(ema_moved) <= chosen and any(not torch.equal(p, dict(trained.named_parameters())[n])
                                            for n, p in ema.named_parameters() if n in chosen)
    # A checkpoint holds the trained weights only, none of the frozen ones.
    ckpt = out / "checkpoints" / "step-000003"
    assert sorted(os.listdir(ckpt)) == ["COMPLETE", "rank-0.pt", "shared.pt", "state.json", "transformer.safetensors"]
    assert set(load_file(ckpt / "transformer.safetensors")) == chosen
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    # Run again, it is up to date; a LoRA run cannot resume the full run's checkpoint.
    assert "up_to_date" in _train(*_args(tiny_model, shard_set_fp32, out, "train.max_steps=6", "checkpoint.every=3",
                                         "full.blocks=[1]", "full.include=[norm_out]", "train.ema=0.5"))
    with pytest.raises(UsageError, match="train.mode full -> lora"):
        _train(*_args(tiny_model, shard_set_fp32, tmp_path / "lora", "train.max_steps=6", "train.mode=lora",
                      f"resume={ckpt}"))


def test_bf16_full_run_resumes_bit_identical_and_its_checkpoint_is_sharded(tiny_model, shard_set_fp32, tmp_path,
                                                                          monkeypatch):
    """bf16 weights (as on a GPU): AdamW with stochastic rounding; the rounding draws are part of the checkpoint,
    so a run resumed from step 3 ends with the same bits as the uninterrupted one."""
    from train import checkpoint
    from train.bf16_optim import AdamWStochasticBf16

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 200_000)  # the tiny model's weights in several files
    common = ("model.precision=bf16", "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=5")
    straight = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "a", *common))
    assert straight["transformer"].transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    ckpt = tmp_path / "a" / "checkpoints" / "step-000003"
    files = sorted(n for n in os.listdir(ckpt) if n.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"transformer-00001-of-{len(files):05d}.safetensors"
    shared = torch.load(ckpt / "shared.pt", weights_only=False)
    assert "rounding_rng" in shared["training"]["optimizer"]
    resumed = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "b", *common, f"resume={ckpt}"))
    a, b = (dict(r["transformer"].named_parameters()) for r in (straight, resumed))
    assert all(torch.equal(a[n], b[n]) for n in a)
    base = dict(_base(tiny_model).to(torch.bfloat16).named_parameters())
    assert sum(not torch.equal(a[n], base[n]) for n in a) > len(a) // 2
    from train.optim import make_optimizer
    from train.config import TrainLoopConfig

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], TrainLoopConfig())
    assert isinstance(opt, AdamWStochasticBf16)


def test_merge_releases_a_full_run_in_both_layouts(tiny_model, shard_set_fp32, tmp_path):
    """merge with transformer.path (the training out.dir): the diffusers release loads with from_pretrained, and
    the single file (with the VAE and text encoders) with from_single_file, to exactly the trained weights; a
    partial run's release is the base with the trained blocks."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from conftest import cli

    run = tmp_path / "run"
    r = _train(*_args(tiny_model, shard_set_fp32, run, "train.max_steps=3", "full.blocks=[0]"))
    trained = {n: p.detach() for n, p in r["transformer"].named_parameters()}
    base = dict(_base(tiny_model).named_parameters())
    out = tmp_path / "release"
    p = cli("merge", f"model.path={tiny_model}", f"transformer.path={run}", f"out.dir={out}", "merge.verify=true")
    assert p.returncode == 0, p.stderr
    assert f"took the transformer trained in {run}" in p.stdout and "LoRA modules" not in p.stdout
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    got = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(got[n], trained[n]) for n in trained)
    changed = {n for n in base if not torch.equal(got[n], base[n])}
    assert changed and all(n.startswith("transformer_blocks.0.") for n in changed)
    again = cli("merge", f"model.path={tiny_model}", f"transformer.path={run}", f"out.dir={out}", "merge.verify=true")
    assert again.returncode == 0 and "merge: up to date" in again.stdout, again.stderr
    card = (out / "README.md").read_text()
    assert "fully fine-tuned transformer" in card and "- lora" not in card and "| steps | 3 |" in card
    single = tmp_path / "single"
    p = cli("merge", f"model.path={tiny_model}", f"transformer.path={run / 'transformer'}", f"out.dir={single}",
            "out.format=single_file", "out.include=[vae,text_encoders]")
    assert p.returncode == 0, p.stderr
    model = SD3Transformer2DModel.from_single_file(str(single / "model.safetensors"), config=tiny_model,
                                                   subfolder="transformer", local_files_only=True,
                                                   torch_dtype=torch.float32)
    got = dict(model.named_parameters())
    assert got.keys() == trained.keys() and all(torch.equal(got[n], trained[n]) for n in trained)
    # A transformer of another architecture is refused in one line.
    other = tmp_path / "other"
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                          attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                          caption_projection_dim=128, pooled_projection_dim=80, pos_embed_max_size=32
                          ).save_pretrained(other)
    p = cli("merge", f"model.path={tiny_model}", f"transformer.path={other}", f"out.dir={tmp_path / 'bad'}")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not a transformer of model.path's architecture" \
        in p.stderr, p.stderr


def test_the_fused_step_updates_in_backward_and_never_holds_the_whole_gradient(tiny_model, shard_set_fp32, tmp_path,
                                                                               monkeypatch):
    """train.fused_step=true: each weight is updated by the hook that runs when its gradient is done, and that
    gradient is freed, so while backward runs at most a handful of gradients exist (without it: all of them at
    the step). Unclipped, the result equals the unfused step's; bf16 weights with Adafactor step the same way."""
    from train import bf16_optim

    live, real = [], bf16_optim.AdamWStochasticBf16.step_weight
    params = {}

    def counting(self, p, group, apply=None):
        live.append(sum(q.grad is not None for q in params["all"]))
        return real(self, p, group, apply)

    monkeypatch.setattr(bf16_optim.AdamWStochasticBf16, "step_weight", counting)
    from train import step as step_module

    real_init = step_module.TrainStep.__init__

    def init(self, accel, transformer, ps, objective, t):
        params["all"] = ps
        real_init(self, accel, transformer, ps, objective, t)

    monkeypatch.setattr(step_module.TrainStep, "__init__", init)
    common = ("train.max_steps=3", "train.max_grad_norm=1e9")
    fused = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "fused", *common, "train.fused_step=true"))
    n = len(params["all"])
    assert len(live) == 3 * n and max(live) <= 3 < n  # every weight stepped once a step, its gradient freed at once
    plain = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "plain", *common))
    a, b = (dict(r["transformer"].named_parameters()) for r in (fused, plain))
    base = dict(_base(tiny_model).named_parameters())
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert sum(not torch.equal(a[k], base[k]) for k in a) > len(a) // 2
    lines = [json.loads(x) for x in open(tmp_path / "fused" / "metrics.jsonl")]
    plain_lines = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    assert [x["grad_norm"] for x in lines] == pytest.approx([x["grad_norm"] for x in plain_lines], rel=1e-4)
    bf16 = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "bf16", "train.max_steps=2", "train.fused_step=true",
                         "model.precision=bf16", "train.optimizer=adafactor"))
    w = dict(bf16["transformer"].named_parameters())
    base16 = dict(_base(tiny_model).to(torch.bfloat16).named_parameters())
    assert sum(not torch.equal(w[k], base16[k]) for k in w) > len(w) // 2
    with pytest.raises(UsageError, match="train.fused_step' needs train.mode=full and train.grad_accum=1"):
        _train(*_args(tiny_model, shard_set_fp32, tmp_path / "x", "train.fused_step=true", "train.grad_accum=2"))


def test_sharded_launches_are_refused_in_one_line(monkeypatch):
    """`accelerate launch --use_fsdp` (or DeepSpeed) sets these; the trainer shards through train.sharding instead
    (accelerate's FSDP runs on GPUs only, where it could not be checked), and says so."""
    from train.step import make_accelerator

    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(var, "true")
        with pytest.raises(UsageError, match=rf"accelerate's {name} launch is not supported; launch with torchrun.*"
                                             r"train.sharding=fsdp"):
            make_accelerator("cpu")
        monkeypatch.delenv(var)
    assert make_accelerator("cpu").distributed_type.value == "NO"


def test_full_mode_learns_in_half_the_steps_lora_needs(tiny_model, shard_set_fp32, tmp_path):
    """Loss at fixed sigmas and noise over the sample photos: full fine-tuning is below LoRA (rank 16) at the
    same step, and at 10 steps below LoRA at 20. Each trains at the best learning rate of a sweep measured on
    these samples (full 3e-3 of 1e-3, 3e-3, 1e-2; LoRA 2e-2 of 1e-2, 2e-2, 5e-2)."""
    from conftest import eval_loss
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import build_run, run_accelerator

    base = eval_loss(_base(tiny_model), shard_set_fp32)
    loss = {}
    for mode, lr in (("lora", 2e-2), ("full", 3e-3)):
        cfg = load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path / mode, f"train.mode={mode}",
                                             f"train.lr={lr}", "lora.rank=16", "lora.alpha=16", "train.max_steps=20"))
        run = build_run(cfg, run_accelerator(cfg))
        run.stream.start()
        try:
            for step in range(1, 21):
                run.stepper.step(run.stream)
                if step in (10, 20):
                    loss[mode, step] = eval_loss(run.transformer, shard_set_fp32)
        finally:
            run.stream.close()
    assert loss["full", 10] < loss["lora", 10] and loss["full", 20] < loss["lora", 20], loss
    assert base - loss["full", 10] > base - loss["lora", 20] + 0.005, (base, loss)


def test_an_ema_updated_every_n_steps_averages_as_one_updated_every_step():
    """ema_every=3 with the weights held still between updates: the same average as an update every step
    (decay^3 per update), on the host beside weights it copies from; the count survives a save and load."""
    from train.optim import Ema

    start = torch.nn.Parameter(torch.zeros(5))
    every_step, every_third = Ema([start], 0.9), Ema([start], 0.9, every=3, device=torch.device("cpu"))
    with torch.no_grad():
        start.fill_(1.0)
    for _ in range(6):
        every_step.update()
        every_third.update()
    assert torch.allclose(every_third.shadow[0], every_step.shadow[0], rtol=1e-6)
    assert torch.allclose(every_step.shadow[0], torch.full((5,), 1 - 0.9 ** 6))
    every_third.update()  # the seventh step: not yet an update
    assert torch.allclose(every_third.shadow[0], every_step.shadow[0], rtol=1e-6)
    again = Ema([start], 0.9, every=3)
    again.load_state_dict(every_third.state_dict())
    assert again.steps == 7


def test_sharding_is_refused_where_it_cannot_run_yet(tiny_model, shard_set_fp32, tmp_path):
    """train.sharding=fsdp: one line for each setting it does not support, and for a single process."""
    from shards.common.config import load_config
    from train.config import TrainConfig

    base = [*_args(tiny_model, shard_set_fp32, tmp_path, "train.sharding=fsdp")]
    for extra, key in (("train.mode=lora", "train.mode"), ("train.fused_step=true", "train.fused_step")):
        with pytest.raises(UsageError, match=f"train.sharding.*fsdp needs.*; {key} is set otherwise"):
            load_config(TrainConfig, base + [extra])
    with pytest.raises(UsageError, match=r"fsdp splits the model across processes; launch with torchrun"):
        _train(*base, "train.max_steps=1")


def test_a_full_run_sigkilled_after_a_checkpoint_resumes_bit_identical(tiny_model, shard_set_fp32, tmp_path):
    """bf16 weights (stochastic rounding), 8-bit AdamW, an EMA on the host: the run killed after its step-4
    checkpoint and run again ends with the uninterrupted run's transformer and EMA, bit for bit."""
    import subprocess
    import sys

    from diffusers import SD3Transformer2DModel

    from conftest import REPO, cli, sigkill_when

    common = _args(tiny_model, shard_set_fp32, tmp_path / "x", "train.max_steps=8", "checkpoint.every=4",
                   "model.precision=bf16", "train.optimizer=adamw8bit", "train.ema=0.9", "train.ema_every=3",
                   "loss.caption_dropout=0.3")
    args = [a for a in common if not a.startswith("out.dir=")]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(*args, f"out.dir={straight}")
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, f"out.dir={killed}"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_when(killed / "checkpoints" / "step-000004" / "COMPLETE", proc, "training")
    assert not (killed / "transformer").exists()
    r = cli("train", *args, f"out.dir={killed}")
    assert r.returncode == 0 and "resuming from" in r.stderr + r.stdout, r.stderr[-2000:]
    for folder in ("transformer", "transformer_ema"):
        a = SD3Transformer2DModel.from_pretrained(str(straight / folder), torch_dtype=torch.bfloat16)
        b = dict(SD3Transformer2DModel.from_pretrained(str(killed / folder), torch_dtype=torch.bfloat16)
                 .named_parameters())
        assert all(torch.equal(p, b[n]) for n, p in a.named_parameters()), folder


def test_ema_every_auto_is_one_on_the_device_and_ten_on_the_host():
    from train.config import TrainLoopConfig
    from train.step import ema_device, ema_every

    full, lora = TrainLoopConfig(mode="full", ema=0.99), TrainLoopConfig(ema=0.99)
    assert ema_device(full) == torch.device("cpu") and ema_every(full) == 10
    assert ema_device(lora) is None and ema_every(lora) == 1
    on_gpu = TrainLoopConfig(mode="full", ema=0.99, ema_device="device")
    assert ema_device(on_gpu) is None and ema_every(on_gpu) == 1
    assert ema_every(TrainLoopConfig(mode="full", ema=0.99, ema_every=4)) == 4
