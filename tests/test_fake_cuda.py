"""The CUDA code paths, run on a fake CUDA device (shards.fake_cuda) on a machine without a GPU.

Exercised here: placement (every tensor the step makes or keeps is on the GPU; a host/GPU mix fails as on a
GPU), `resolve_dtypes` for a bf16-capable GPU, the run's Accelerator with CUDA autocast around the forward,
gradient checkpointing's recomputation under autocast, flash attention's kernels (as an H100 picks them), the
optimizer step and EMA, the validation sampler's denoising step, and precompute's CLIP, T5 (bf16) and VAE
encoders. The step may read one value on the host (whether the loss and gradient norm were finite); nothing
else may sync or copy to the host.

Not exercised, because their kernels cannot run on fake tensors: bitsandbytes' nf4 path (Linear4bit's
`quantize_4bit` when the weight moves to the GPU, and `matmul_4bit` / `dequantize_4bit` in forward and
backward) and its int8 path (Int8Params' `int8_vectorwise_quant` on the move, and `MatMul8bitLt`'s
`int8_linear_matmul` / `int8_mm_dequant`); transformers' 4-bit T5 load (its bitsandbytes quantizer refuses a
machine without a GPU). Those are each a CUDA kernel call, not placement or dtype logic of this project;
the GPU check runs them for real.
"""
import os

import pytest
import torch

from conftest import REPO
from shards.fake_cuda import FakeCuda, StepAudit
from bench.measure import TRANSFORMER_CONFIGS

MATMULS = {"mm", "addmm", "bmm", "convolution", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention"}
CUDA = torch.device("cuda", 0)


def _tiny_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIGS["tiny"]).requires_grad_(False)


def _on_cuda(tensors) -> list:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.device != CUDA]


@pytest.mark.parametrize("precision,checkpointing", [("bf16", False), ("bf16", True), ("fp32", False),
                                                     ("fp32", True)])
def test_the_lora_step_runs_on_cuda_in_the_dtypes_it_means(precision, checkpointing):
    from train.synthetic import bench_config
    from train.fake_gpu import denoise_step, lora_step
    from train.objective import resolve_dtypes

    cfg = bench_config("none", checkpointing, batch=2)
    cfg.train.ema = 0.99
    if precision == "fp32":
        cfg.model.precision, cfg.train.mixed_precision = "fp32", "no"
    transformer = _tiny_transformer()
    with FakeCuda():
        weight_dtype, amp = resolve_dtypes(cfg, CUDA)  # `auto` on a bf16-capable GPU: bf16 weights and autocast
        assert (weight_dtype, amp) == ((torch.bfloat16, "bf16") if precision == "bf16" else (torch.float32, "no"))
        transformer.to(CUDA, weight_dtype)
        r = lora_step(transformer, cfg, resolution=128, text_tokens=154)
        stepper = r.stepper
        assert r.out["applied"] is True
        # The one host read the step makes (whether the unfused step is finite), and no copy back to the host.
        with open(os.path.join(REPO, "train", "step.py")) as f:
            reads = [i for i, line in enumerate(f, 1) if "applied = bool(finite)" in line]
        assert [w for _, w in r.audit.syncs] == [f"train/step.py:{reads[-1]}"], r.audit.syncs
        assert r.audit.host_copies == []
        for name in ("loss", "grad_norm", "sigmas", "losses"):
            assert r.out[name].device == CUDA, name
        assert not _on_cuda(transformer.parameters()) and not _on_cuda(transformer.buffers())
        state = [v for s in stepper.opt.optimizer.state.values() for v in s.values()]
        assert len(state) == 3 * len(stepper.params)  # AdamW: step, exp_avg, exp_avg_sq per LoRA tensor
        assert not _on_cuda([v for v in state if v.dim() > 0])  # step counts stay on the host, as torch keeps them
        assert not _on_cuda(stepper.ema.shadow) and all(s.dtype == torch.float32 for s in stepper.ema.shadow)
        assert all(p.dtype == torch.float32 and p.grad is None for p in stepper.params)  # fp32 LoRA, grads freed

        ran = {}
        for (op, dtype), n in r.audit.dtypes.items():
            ran.setdefault(op, set()).add(dtype)
        # Under bf16 autocast every matmul, convolution and attention runs in bf16, and the layer norms in fp32
        # (CUDA autocast's lists); without autocast everything is fp32.
        want = "bfloat16" if precision == "bf16" else "float32"
        assert {op: d for op, d in ran.items() if op in MATMULS and d != {want}} == {}
        assert ran["native_layer_norm"] == {"float32"}
        assert ("_scaled_dot_product_flash_attention" in ran) == (precision == "bf16")

        audit = StepAudit()
        latents = denoise_step(transformer, 128, 154, audit, weight_dtype)
        assert latents.device == CUDA and latents.dtype == torch.float32 and latents.shape == (1, 16, 16, 16)
        assert audit.syncs == [] and audit.host_copies == []


def test_a_host_tensor_in_a_cuda_op_fails_as_on_a_gpu():
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with FakeCuda():
        a = torch.ones(3).to("cuda")
        assert a.device == CUDA
        with pytest.raises(FakeTensorDeviceMismatchError):
            a + torch.empty(3)


def test_precompute_encoders_run_on_cuda(tiny_model):
    from precompute.encoders import TextEncoders, VaeEncoder, resolve_dtype

    clip_dtype = resolve_dtype("auto", CUDA)
    assert clip_dtype == torch.float16
    text = TextEncoders.load(tiny_model, "bf16", clip_dtype, torch.device("cpu"), 32)  # loaded on the host, as from disk
    vae = VaeEncoder.load(tiny_model, torch.float32, torch.device("cpu"))
    with FakeCuda():
        for m in text.clips:
            m.to(CUDA)
        text.t5.to(CUDA)
        vae.vae.to(CUDA)
        text.device = vae.device = CUDA
        clip, t5, vae_audit = StepAudit(), StepAudit(), StepAudit()
        t5_forward = text.t5.forward

        def audited_t5(*a, **k):  # T5's ops apart from CLIP's, inside the same encode call
            clip.__exit__(None, None, None)
            try:
                with t5:
                    return t5_forward(*a, **k)
            finally:
                clip.__enter__()

        text.t5.forward = audited_t5
        with clip:
            embeds, pooled = text.encode(["a photo of a cat", "a red rocket"])
        with vae_audit:
            mean, std = vae.encode(torch.zeros(2, 3, 64, 64))
        for audit in (clip, t5, vae_audit):
            assert audit.syncs == [] and audit.host_copies == []
        for t in (embeds, pooled, mean, std):
            assert t.device == CUDA and t.dtype == torch.float32
        assert embeds.shape[:2] == (2, 77 + 32) and mean.shape == (2, 16, 8, 8)

        def matmul_dtypes(audit):
            return {d for (op, d) in audit.dtypes if op in MATMULS}

        assert matmul_dtypes(clip) == {"float16"}
        # T5 in bf16, except the feed-forward output layers transformers keeps in fp32 (T5 overflows in half).
        assert matmul_dtypes(t5) == {"bfloat16", "float32"}
        assert matmul_dtypes(vae_audit) == {"float32"}


def test_t5_in_fp16_keeps_its_overflowing_layers_in_fp32(tiny_model):
    """T5 v1.1 (SD3's T5-XXL) overflows fp16 in its feed-forward output layers (`wo`); transformers keeps those
    in fp32, so an fp16 T5 computes every other matmul in fp16 and those in fp32 (on the GPU's code path)."""
    from precompute.encoders import TextEncoders

    text = TextEncoders.load(tiny_model, "fp16", torch.float16, torch.device("cpu"), 32)
    assert {n.split(".")[-2] for n, p in text.t5.named_parameters() if p.dtype == torch.float32} == {"wo"}
    with FakeCuda():
        text.t5.to(CUDA)
        audit = StepAudit()
        ids = torch.ones(2, 32, dtype=torch.long).to(CUDA)
        with audit:
            out = text.t5(ids)[0]
        assert out.device == CUDA and audit.syncs == []
        assert {d for (op, d) in audit.dtypes if op in MATMULS} == {"float16", "float32"}


def test_fake_cuda_gives_back_everything_it_changes():
    import torch.cuda.amp.common as amp_common
    import torch.nn.functional as F
    from torch._subclasses import fake_tensor as ft

    from shards.fake_cuda import _guard_registry

    def state():
        return (_guard_registry()[1], torch.utils.swap_tensors, F.scaled_dot_product_attention,
                torch.amp.autocast_mode.autocast.__enter__, torch.amp.autocast_mode.autocast.__exit__,
                amp_common.amp_definitely_not_available, torch.cuda.get_device_capability, torch.cuda.is_bf16_supported,
                ft.FakeTensor.__dict__["__torch_dispatch__"], ft.FakeTensor.__dict__["_normalize_fake_device"],
                ft._DISPATCH_META_HANDLERS[torch.ops.prim.device.default],
                torch.autograd.is_multithreading_enabled())

    before = state()
    with FakeCuda():
        assert state() != before
    assert state() == before
    if not torch.cuda.is_available():  # and real CUDA is as absent as before
        with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
            torch.empty(1, device="cuda")


def test_idle_encoders_wait_on_the_host(tiny_model):
    """`offload: idle` on the GPU's code path: only the encoder running is on the device, the others in host
    memory; the results come back to the host."""
    from precompute.encoders import Residency, TextEncoders, VaeEncoder

    residency = Residency(CUDA, idle=True)
    text = TextEncoders.load(tiny_model, "bf16", torch.float16, CUDA, 32, residency)
    vae = VaeEncoder.load(tiny_model, torch.float32, CUDA, residency=residency)
    modules = {"clip_l": text.clips[0], "clip_g": text.clips[1], "t5": text.t5, "vae": vae.vae}

    def on_device():
        places = {n: {p.device.type for p in m.parameters()} for n, m in modules.items()}
        assert all(len(p) == 1 for p in places.values())
        return [n for n, p in places.items() if p == {"cuda"}]

    assert on_device() == []  # loaded straight to the host
    with FakeCuda():
        mean, _ = vae.encode(torch.zeros(2, 3, 64, 64))
        assert on_device() == ["vae"] and mean.device == CUDA
        (embeds, pooled), = text.encode_batches([["a photo of a cat", "a red rocket"]])
        assert on_device() == ["t5"] and embeds.device.type == pooled.device.type == "cpu"
        assert embeds.shape[:2] == (2, 77 + 32) and residency.switches == 4
        residency.keep_all(modules.values())
        assert on_device() == list(modules)


def test_an_int8_layer_moved_to_the_device_holds_its_weight_once():
    """bitsandbytes' int8 layer refers to its weight twice: as the parameter's `CB` until its first forward, as
    its matmul state's `CB` after it. `Module.to` onto the GPU moves the parameter's data alone (its `CB` keeps
    the old tensor, `Linear8bitLt.to` copies the state apart), which leaves two copies. The encoders' move
    shares one again, before a forward and after. bitsandbytes' parameter class cannot be moved onto fake or
    meta tensors, so the test makes the two copies such a move leaves and moves on the host."""
    import bitsandbytes as bnb

    from precompute.encoders import _move

    m = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False).to("cpu")  # quantized on the host
    x = torch.randn(4, 64, dtype=torch.float16)

    def storages(where):
        return {t.untyped_storage().data_ptr() for t in (m.weight, where)}

    m.weight.CB = m.weight.CB.clone()  # before any forward, as after `Module.to("cuda")`
    assert len(storages(m.weight.CB)) == 2
    _move(m, torch.device("cpu"))
    assert len(storages(m.weight.CB)) == 1
    before = m(x)  # the weight is now the matmul state
    assert m.weight.CB is None and len(storages(m.state.CB)) == 1
    m.state.CB = m.state.CB.clone()  # after a forward, as after `Module.to("cuda")`
    assert len(storages(m.state.CB)) == 2
    _move(m, torch.device("cpu"))
    assert len(storages(m.state.CB)) == 1 and torch.equal(m(x), before)


def test_full_mode_keeps_its_ema_on_the_host_unless_asked():
    """train.mode=full: the fp32 EMA (twice the bf16 weights) stays off the GPU by default; ema_device=device puts
    it there, and the bytes the run holds between steps grow by exactly that."""
    from bench.memory import modelled_full_optimizers  # the bf16 optimizer's rounding generator, modelled
    from train.fake_gpu import CUDA, lora_step
    from train.synthetic import bench_config

    held = {}
    for where in ("auto", "device"):
        cfg = bench_config("none", False, batch=1)
        cfg.model.precision = cfg.train.mixed_precision = "bf16"
        cfg.train.mode, cfg.train.ema, cfg.train.ema_every, cfg.train.ema_device = "full", 0.9, 2, where
        transformer = _tiny_transformer()
        with FakeCuda(), modelled_full_optimizers():
            transformer.to(CUDA, torch.bfloat16)
            r = lora_step(transformer, cfg, resolution=128, text_tokens=154, memory=True)
            ema = r.stepper.ema
            assert {s.device.type for s in ema.shadow} == {"cpu" if where == "auto" else "cuda"}
            assert ema.steps == 2 and all(s.dtype == torch.float32 for s in ema.shadow)
            with ema.swapped():  # what validation and the final save do: the trained weights wait on the host
                assert all(p.device == CUDA for p in transformer.parameters())
        held[where] = r.held_bytes
    params = list(transformer.parameters())
    fp32 = sum(4 * p.numel() for p in params)
    assert 0 <= held["device"] - held["auto"] - fp32 <= 512 * len(params)  # each rounded up to a 512-byte block
