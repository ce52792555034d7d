"""Stage 2 as a long job: exact resume after SIGKILL, presets, QLoRA, optimizers, schedules, EMA, validation."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, cli, sigkill_when, tiny_model_copy


def _args(model, shards, out, *extra):
    return [f"model.path={model}", f"data.shards={shards}", f"out.dir={out}", "train.batch_size=2", "lora.rank=4",
            "lora.alpha=8", "validation.enabled=false", "train.lr=2e-3", *extra]


def _train(*argv):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    return train(load_config(TrainConfig, list(argv)))


def test_sigkill_then_resume_is_bit_identical(tiny_model, shard_set_fp32, tmp_path):
    common = ["train.max_steps=16", "checkpoint.every=4", "train.lr_schedule=cosine", "train.warmup_steps=3",
              "train.ema=0.9", "lora.dropout=0.1", "loss.caption_dropout=0.2", "validation.enabled=true",
              "validation.every=3", "validation.steps=3"]  # validations at steps the resumed run never validates at
    env = {**os.environ, "PYTHONPATH": REPO}
    # The uninterrupted run and the resume run in this process, the killed run in its own: the resume has
    # nothing of the killed run but what it left on disk.
    straight, out = tmp_path / "straight", tmp_path / "killed"
    _train(*_args(tiny_model, shard_set_fp32, straight, *common))
    proc = subprocess.Popen([sys.executable, "-m", "train", *_args(tiny_model, shard_set_fp32, out, *common)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(out / "checkpoints" / "step-000008" / "COMPLETE", proc, "training")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    r = cli("train", *_args(tiny_model, shard_set_fp32, out, *common))  # resume: auto
    assert r.returncode == 0 and "resuming from" in r.stderr + r.stdout, r.stderr[-2000:]
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(straight / name), load_file(out / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = load_file(out / "pytorch_lora_weights_ema.safetensors"), load_file(out / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    with safe_open(out / "pytorch_lora_weights_ema.safetensors", "pt") as f:  # folded like the LoRA itself
        header = f.metadata()
    assert json.loads(header["lora_adapter_metadata"])["transformer.lora_alpha"] == 4
    assert json.loads(header["shardtune"])["scale_folded_into_lora_B"] == 2
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, 17))  # no step logged twice after the resume
    kept = sorted(os.listdir(out / "checkpoints"))
    assert kept == ["step-000012", "step-000016"]  # checkpoint.keep = 2


def test_resume_with_other_lora_settings_is_refused(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.errors import UsageError

    _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=2"))
    with pytest.raises(UsageError, match=r"lora.rank 4 -> 8"):
        _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=4", "lora.rank=8"))
    with pytest.raises(UsageError, match="lora.targets"):
        _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=4", "lora.targets=attn_image"))
    r = _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=4"))  # same settings: continues
    assert r["steps"] == 4


@pytest.mark.parametrize("preset, per_block", [("attn", 8), ("attn_image", 4), ("all_linear", 14)])
def test_presets_target_exactly_the_intended_modules(preset, per_block, tiny_model):
    from diffusers import SD3Transformer2DModel

    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.model import lora_module_names

    t = SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer"))
    cfg = load_config(TrainConfig, [f"model.path={tiny_model}", "data.shards=/tmp", "out.dir=x", f"lora.targets={preset}"])
    names = lora_module_names(t, cfg.lora)
    first = [n for n in names if n.startswith("transformer_blocks.0.")]
    last = [n for n in names if n.startswith("transformer_blocks.1.")]  # context_pre_only: no to_add_out / ff_context
    assert len(first) == per_block
    expected_last = {"attn": 7, "attn_image": 4, "all_linear": 11}[preset]
    assert len(last) == expected_last
    cfg.lora.blocks = [1]
    assert all(n.startswith("transformer_blocks.1.") for n in lora_module_names(t, cfg.lora))


@pytest.mark.parametrize("kind, layer, peft_layer", [("nf4", "Linear4bitInComputeDtype", "Linear4bit"),
                                                     ("int8", "Linear8bitLtNoSavedInput", "Linear8bitLt")])
def test_quantized_base_trains_and_diffusers_loads_the_lora(kind, layer, peft_layer, tiny_model, shard_set_fp32,
                                                            tmp_path):
    from diffusers import StableDiffusion3Pipeline

    r = _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=3", f"model.quantize={kind}"))
    to_q = r["transformer"].transformer_blocks[0].attn.to_q
    assert type(to_q.base_layer).__name__ == layer
    # peft's own bitsandbytes LoRA layer, whose merge requantizes (a plain one would add into packed bytes).
    assert type(to_q).__module__ == "peft.tuners.lora.bnb" and type(to_q).__name__ == peft_layer
    lora = load_file(r["lora"])
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(os.path.dirname(r["lora"]))
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_is_read_tensor_by_tensor_into_the_same_model(kind, tiny_model, monkeypatch):
    """load_transformer quantizes each block linear as it reads it (never the whole model in full precision
    first); the model, its LoRA module names and a training step are exactly those of loading it whole."""
    from diffusers import SD3Transformer2DModel

    from train.synthetic import bench_config
    from train.fake_gpu import lora_step
    from train.model import freeze_and_place, load_transformer

    cpu = torch.device("cpu")
    whole = freeze_and_place(SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer"),
                                                                   torch_dtype=torch.float32), torch.float32, cpu, kind)
    monkeypatch.setattr(SD3Transformer2DModel, "from_pretrained", None)  # the quantized path must not load whole
    streamed = load_transformer(tiny_model, torch.float32, cpu, kind)
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    assert [type(m).__name__ for _, m in streamed.named_modules()] == [type(m).__name__ for _, m in whole.named_modules()]
    cfg = bench_config(kind, checkpointing=False, batch=2)
    cfg.model.precision = "fp32"
    steps = [lora_step(t, cfg, 64, 77 + 32, device=cpu).stepper for t in (streamed, whole)]
    la, lb = (dict(s.named_trained_params()) for s in steps)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert any(v.abs().sum() > 0 for k, v in la.items() if "lora_B" in k)  # the step moved the LoRA


def test_merging_lora_into_an_nf4_base_in_place_requantizes(tiny_model):
    """peft's merge on the trainer's nf4 model (diffusers' fuse_lora calls it) dequantizes, adds the delta and
    quantizes again: the merged layer computes what base + LoRA computed, within nf4's rounding."""
    from train.config import LoraConfig
    from train.model import add_lora, load_transformer

    t = load_transformer(tiny_model, torch.float32, torch.device("cpu"), "nf4")
    add_lora(t, LoraConfig(rank=4, alpha=4))
    layer = t.transformer_blocks[0].attn.to_q
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(8, layer.in_features)
    with torch.no_grad():
        with_lora, base = layer(x), layer.base_layer(x)
        with pytest.warns(UserWarning, match="4-bit linear"):  # peft's bitsandbytes merge says so
            layer.merge()
        merged = layer(x)
    delta = (with_lora - base).abs().mean()
    assert delta > 0.1  # the LoRA changes the output clearly
    assert (merged - with_lora).abs().mean() < 0.1 * delta  # and the merged layer keeps that change


def test_int8_layers_keep_nothing_for_backward_so_checkpointing_frees_their_inputs():
    """bitsandbytes' int8 matmul keeps each input on its autograd context, out of checkpointing's reach. The
    trainer's int8 layer keeps nothing and gives the same input gradient."""
    import bitsandbytes as bnb
    from torch.utils.checkpoint import checkpoint

    from shards.fake_cuda import LiveBytes
    from train.model import quantized_linear

    torch.manual_seed(0)
    weights = [(torch.randn(1024, 256) / 16, torch.randn(256, 1024) / 32) for _ in range(6)]

    def blocks(ours: bool):
        out = []
        for up, down in weights:
            if ours:
                a, b = (quantized_linear("int8", w.clone(), None, torch.float32, torch.device("cpu")) for w in (up, down))
            else:
                a, b = (bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
                        for w in (up, down))
                a.weight, b.weight = (bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
                                      for w in (up, down))
                a, b = a.to("cpu"), b.to("cpu")
            out.append(torch.nn.Sequential(a, torch.nn.GELU(), b))
        return out

    def run(ours: bool):
        x = torch.randn(512, 256, requires_grad=True, generator=torch.Generator().manual_seed(1))
        live = LiveBytes("cpu")
        with live:
            h = x
            for block in blocks(ours):
                h = checkpoint(block, h, use_reentrant=False)
            held = live.now  # after the forward: what backward will need
            h.square().sum().backward()
        return held, x.grad

    ours_held, ours_grad = run(True)
    theirs_held, theirs_grad = run(False)
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)
    # Each block's 512x1024 fp32 hidden input (2 MiB) stays with bitsandbytes' layer, not with ours.
    assert theirs_held - ours_held >= 6 * 2 * 2 ** 20


def test_nf4_layers_return_the_compute_dtype():
    """bitsandbytes' Linear4bit hands back its input's dtype: fp32 after an autocast LayerNorm, which doubles
    every activation after it. The trainer's nf4 layers return the compute dtype, with the same values."""
    import bitsandbytes as bnb

    from train.model import quantize_blocks

    torch.manual_seed(0)
    block = torch.nn.Module()
    block.transformer_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 128))])
    ours = quantize_blocks(block, "nf4", torch.bfloat16, torch.device("cpu")) and block.transformer_blocks[0][0]
    theirs = bnb.nn.Linear4bit(64, 128, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.weight, theirs.bias = ours.weight, ours.bias
    x = torch.randn(4, 64)
    assert isinstance(ours, bnb.nn.Linear4bit)
    assert theirs(x).dtype == torch.float32 and ours(x).dtype == torch.bfloat16
    assert torch.equal(ours(x), theirs(x).bfloat16())


def test_deterministic_mode_runs_with_deterministic_kernels_only_and_then_lets_go(tiny_model, shard_set_fp32, tmp_path,
                                                                                 monkeypatch):
    import train.loop as loop

    seen = []
    build = loop.build_run

    def recording(cfg, accel):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return build(cfg, accel)

    monkeypatch.setattr(loop, "build_run", recording)
    runs = [_train(*_args(tiny_model, shard_set_fp32, tmp_path / name, "train.max_steps=3", *extra))
            for name, extra in (("plain", ()), ("deterministic", ("train.deterministic=true",)))]
    assert seen == [(False, True), (True, False)]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cuda.flash_sdp_enabled()
    # Attention runs another kernel (not flash), so the weights agree to rounding.
    a, b = (load_file(r["lora"]) for r in runs)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and diff < 1e-4


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_other_optimizers_train(optimizer, tiny_model, shard_set_fp32, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    chosen = {"adamw8bit": bnb.optim.AdamW8bit, "adafactor": Adafactor}[optimizer]
    steps = []
    step = chosen.step
    monkeypatch.setattr(chosen, "step", lambda self, *a, **k: steps.append(type(self)) or step(self, *a, **k))
    r = _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=3", f"train.optimizer={optimizer}"))
    assert steps == [chosen] * 3  # that optimizer made every step
    lora = load_file(r["lora"])
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_lr_schedules():
    from train.optim import lr_factor

    assert [lr_factor(s, "constant", 2, 10) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, "linear", 2, 10) == 1.0 and lr_factor(6, "linear", 2, 10) == 0.5
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5) and lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0)


def test_validation_images_change_as_the_lora_learns(tiny_model, shard_set_fp32, tmp_path):
    _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=10", "validation.enabled=true",
                      "validation.every=5", "validation.steps=3", "train.lr=1e-2"))
    a = Image.open(tmp_path / "samples" / "step-000005.png")
    b = Image.open(tmp_path / "samples" / "step-000010.png")
    assert a.size == b.size and a.tobytes() != b.tobytes()


def test_non_finite_run_stops_with_a_checkpoint(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.errors import DataError

    with pytest.raises(DataError, match="the state is saved in"):
        _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=20", "train.lr=1e30",
                      "train.max_grad_norm=1e30", "train.max_bad_steps=3"))
    assert any(n.startswith("step-") for n in os.listdir(tmp_path / "checkpoints"))


def test_flip_and_prior_weight_in_the_objective(tiny_model, shard_set_fp32):
    from dataclasses import replace

    from shards import read_extras, read_manifest
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.data import bucket_batches
    from train.model import load_transformer, scheduler_config
    from train.objective import Objective

    manifest = replace(read_manifest(shard_set_fp32), flipped_latents=True)
    t = load_transformer(tiny_model, torch.float32, torch.device("cpu"))

    def loss(batch, *over):
        cfg = load_config(TrainConfig, [f"model.path={tiny_model}", f"data.shards={shard_set_fp32}", "out.dir=x", *over])
        obj = Objective(cfg, manifest, read_extras(shard_set_fp32), scheduler_config(tiny_model),
                        torch.device("cpu"), torch.float32)
        with torch.no_grad():
            return obj(t, batch, 0)[0]

    batch = next(bucket_batches(shard_set_fp32, 2, seed=0))
    g = torch.Generator().manual_seed(9)
    batch["latent_mean_flip"] = torch.randn(batch["latent_mean"].shape, generator=g)
    batch["latent_std_flip"] = batch["latent_std"].clone()
    # flip=1: the stored flipped latent is used and the plain one is not.
    other_plain = dict(batch, latent_mean=torch.zeros_like(batch["latent_mean"]))
    assert torch.equal(loss(batch, "data.flip=1.0"), loss(other_plain, "data.flip=1.0"))
    assert not torch.allclose(loss(batch, "data.flip=1.0"), loss(batch, "data.flip=0.0"))
    no_flips = {k: v for k, v in batch.items() if not k.endswith("_flip")}
    assert torch.equal(loss(no_flips, "data.flip=1.0"), loss(no_flips, "data.flip=0.0"))  # a set without flips
    batch["prior"] = [True, False]
    zero = loss(batch, "loss.prior_weight=0", "data.flip=0")
    full = loss(batch, "data.flip=0")
    assert 0 < zero < full


def test_sd35_medium_layout_dual_attention_and_qk_norm(tmp_path_factory, shard_set_fp32, tmp_path):
    """A tiny model with SD3.5 Medium's structure: rms qk-norm and a dual-attention first block."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.model import lora_module_names

    model = tiny_model_copy(tmp_path_factory, "sd35m", qk_norm="rms_norm", dual_attention_layers=(0,))
    t = SD3Transformer2DModel.from_pretrained(os.path.join(model, "transformer"))
    counts = {}
    for preset in ("attn", "attn_image", "all_linear"):
        cfg = load_config(TrainConfig, [f"model.path={model}", "data.shards=/tmp", "out.dir=x", f"lora.targets={preset}"])
        names = lora_module_names(t, cfg.lora)
        counts[preset] = sum(n.startswith("transformer_blocks.0.") for n in names)
        assert all(".attn2." not in n for n in names) or preset != "attn"
    assert counts == {"attn": 8, "attn_image": 8, "all_linear": 18}
    r = _train(*_args(model, shard_set_fp32, tmp_path, "train.max_steps=2", "lora.targets=all_linear"))
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.load_lora_weights(os.path.dirname(r["lora"]))
    probe = dict(hidden_states=torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)),
                 timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 154, 128),
                 pooled_projections=torch.randn(1, 80), return_dict=False)
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(**probe)[0], r["transformer"](**probe)[0], atol=1e-5)


def test_tensorboard_tracker_gets_the_loss(tiny_model, shard_set_fp32, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(*_args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=3", "train.trackers=[tensorboard]"))
    runs = [os.path.join(root) for root, _, files in os.walk(tmp_path) if any(f.startswith("events.out") for f in files)]
    assert runs
    acc = EventAccumulator(runs[0])
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_torch_compile_trains_like_eager(tiny_model, shard_set_fp32, tmp_path, monkeypatch):
    """model.compile=true traces every block with dynamo and AOTAutograd, where a LoRA layer, gradient
    checkpointing or a hook would break the graph or change the numbers. The blocks compile with the
    aot_eager backend here: inductor's CPU code generation costs ~70 s of C++ compiling on a cold cache on
    this machine, and is not what runs on a user's GPU (Triton kernels) anyway."""
    compiled_blocks = []
    compile_module = torch.nn.Module.compile

    def compile_for_test(self, *args, **kwargs):
        compiled_blocks.append(type(self).__name__)
        return compile_module(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    eager = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "eager", "train.max_steps=2"))
    assert compiled_blocks == []
    compiled = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "compiled", "train.max_steps=2", "model.compile=true"))
    assert compiled_blocks == ["JointTransformerBlock"] * 2
    a, b = load_file(eager["lora"]), load_file(compiled["lora"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)


def test_resume_from_a_named_checkpoint_into_a_new_folder(tiny_model, shard_set_fp32, tmp_path):
    first = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "a", "train.max_steps=4", "checkpoint.every=2"))
    r = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "b", "train.max_steps=4",
                      f"resume={tmp_path / 'a' / 'checkpoints' / 'step-000002'}"))
    a, b = load_file(first["lora"]), load_file(r["lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shard_sets_by_url_pipe_and_brace_pattern(tiny_model, shard_set_fp32, tmp_path):
    import functools
    import http.server
    import shutil
    import threading

    local = _train(*_args(tiny_model, shard_set_fp32, tmp_path / "local", "train.max_steps=2"))
    root = os.path.dirname(shard_set_fp32)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(shard_set_fp32)}"
        remote = _train(*_args(tiny_model, url, tmp_path / "http", "train.max_steps=2"))
    finally:
        server.shutdown()
    piped = _train(*_args(tiny_model, f"pipe:cat {shard_set_fp32}", tmp_path / "pipe", "train.max_steps=2"))
    ref = load_file(local["lora"])
    for r in (remote, piped):
        got = load_file(r["lora"])
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    for i in (0, 1):
        shutil.copytree(shard_set_fp32, tmp_path / f"set-{i}")
    from shards.common.config import load_config
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, _args(tiny_model, f"{tmp_path}/set-{{0,1}}@2,{shard_set_fp32}", tmp_path / "x"))
    assert cfg.data.weighted() == [(f"{tmp_path}/set-0", 2.0), (f"{tmp_path}/set-1", 2.0), (shard_set_fp32, None)]
    both = _train(*_args(tiny_model, f"{tmp_path}/set-{{0..1}}", tmp_path / "brace", "train.max_steps=2"))
    listed = _train(*_args(tiny_model, f"{tmp_path}/set-0,{tmp_path}/set-1", tmp_path / "listed", "train.max_steps=2"))
    assert both["steps"] == 2
    a, b = load_file(both["lora"]), load_file(listed["lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # the pattern trained on both sets, as naming them does


def test_compiled_blocks_share_graphs_and_go_dynamic_across_buckets():
    """model.compile=true compiles every block; identical blocks share one graph (torch inlines nn.Modules, so
    no per-block cache entries pile up against dynamo's cache_size_limit), and a second bucket shape makes the
    graphs dynamic, so further buckets compile nothing new and nothing falls back to eager."""
    import torch._dynamo
    from diffusers import SD3Transformer2DModel
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=12,
                              attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                              caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=32).eval()
    for block in t.transformer_blocks:
        block.compile(backend="aot_eager")  # what model.compile does, on the backend the other compile test uses
    graphs = []
    for h, w in ((16, 16), (16, 24), (24, 16), (32, 32), (24, 32), (32, 16)):  # six buckets
        with torch.no_grad():
            t(hidden_states=torch.randn(1, 16, h, w), encoder_hidden_states=torch.randn(1, 7, 64),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([500.0]))
        graphs.append(counters["stats"]["unique_graphs"])
    # Two kinds of block (the last one has no context output), each static once, then dynamic once.
    assert graphs == [2, 4, 4, 4, 4, 4], graphs
    assert not counters["unimplemented"] and not any("cache_size_limit" in k for k in counters["graph_break"])
    torch._dynamo.reset()
