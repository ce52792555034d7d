"""The trainer's own LoRA step on a fake CUDA device (shards.fake_cuda): what a GPU run does, on any machine.

Everything is the run's code: `resolve_dtypes` for the device, the run's Accelerator (its autocast wraps the
model's forward as on a GPU), `prepare_lora`, `Objective`, `TrainStep` with its EMA, and the validation
sampler's denoising step. Only the Accelerator's device is set by hand to the fake `cuda:0` (Accelerate
would otherwise look for a real GPU). Used by the tests of the CUDA code paths and by `make bench`'s
modelled-memory rows.
"""
import contextlib
from types import SimpleNamespace
from typing import Optional

import torch

from shards.fake_cuda import LiveBytes, StepAudit

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def fake_accelerator(amp: str):
    """The run's Accelerator, with the fake GPU as its device (autocast then wraps the forward for CUDA) while
    the context is open; Accelerate's process-wide state gets its own device back after."""
    from accelerate.state import PartialState

    from .step import make_accelerator

    accel = make_accelerator("cpu", amp, 1)
    host = accel.state.device
    PartialState().device = accel.state.device = CUDA  # AcceleratorState holds a copy of PartialState's
    if accel.device != CUDA:
        raise AssertionError(f"the accelerator's device is {accel.device}, not the fake GPU")
    try:
        yield accel
    finally:
        PartialState().device = accel.state.device = host


def empty_extras(config, text_tokens: int) -> dict:
    return {"empty_prompt_embeds": torch.zeros(text_tokens, config.joint_attention_dim),
            "empty_pooled_prompt_embeds": torch.zeros(config.pooled_projection_dim)}


def lora_step(transformer, cfg, resolution: int, text_tokens: int, memory: bool = False,
              audit: Optional[StepAudit] = None, device: torch.device = CUDA) -> SimpleNamespace:
    """One training step of the run's TrainStep on `transformer` (already on fake CUDA, frozen, in the base
    dtype) inside an open `FakeCuda()` (or, with `device` the CPU, on the host). Returns the step's output and
    the audit of the step; with `memory` the step is the run's second (the first creates the optimizer state)
    and the result has the peak of live bytes during it (`LiveBytes`) and the bytes held before it (weights,
    LoRA, optimizer state, EMA)."""
    from .objective import resolve_dtypes
    from .step import make_accelerator

    weight_dtype, amp = resolve_dtypes(cfg, device)
    # On the host: the same step with real or fake tensors, to check the memory model against a real run.
    with fake_accelerator(amp) if device.type == "cuda" else contextlib.nullcontext(make_accelerator("cpu", amp, 1)) \
            as accel:
        return _run_steps(accel, transformer, cfg, resolution, text_tokens, memory, audit, device, weight_dtype, amp)


def _run_steps(accel, transformer, cfg, resolution, text_tokens, memory, audit, device, weight_dtype, amp):
    from .synthetic import BENCH_MANIFEST, SD3_SCHEDULER, random_batch
    from .objective import Objective, prepare_trainable
    from .step import TrainStep

    torch.manual_seed(cfg.train.seed)
    params = prepare_trainable(transformer, cfg)
    objective = Objective(cfg, BENCH_MANIFEST, empty_extras(transformer.config, text_tokens), SD3_SCHEDULER, device,
                          weight_dtype)
    stepper = TrainStep(accel, transformer, params, objective, cfg.train)
    batch = random_batch(transformer.config, resolution, cfg.train.batch_size, text_tokens, cfg.train.seed)
    audit = audit or StepAudit()
    live = None
    if memory:
        # The steady state: a first step creates the optimizer state, the second is the one measured.
        with audit:
            stepper.step(lambda: batch)
        live = LiveBytes(device.type)
        live.hold(t for t in _state_tensors(transformer, stepper))
        held = live.now
    with audit:
        with live if live is not None else _nothing():
            out = stepper.step(lambda: batch)
    result = SimpleNamespace(out=out, audit=audit, stepper=stepper, weight_dtype=weight_dtype, amp=amp)
    if live is not None:
        result.peak_bytes, result.held_bytes = live.peak, held
    return result


def _state_tensors(transformer, stepper):
    """Every tensor a run holds between steps: weights and buffers, LoRA, optimizer state, EMA."""
    yield from transformer.parameters()
    yield from transformer.buffers()
    opt = stepper.opt.optimizer
    inner = [o for _, o in getattr(opt, "_inner", {}).values()]  # per-weight optimizers (train.bf16_optim)
    for o in [opt] + inner:
        for state in o.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    if stepper.ema is not None:
        yield from stepper.ema.shadow


@contextlib.contextmanager
def _nothing():
    yield


def denoise_step(transformer, resolution: int, text_tokens: int, audit: StepAudit, dtype: torch.dtype):
    """One step of the validation sampler's denoising loop (`train.sampling.denoise`: the guided model call
    and the scheduler step) on `transformer` as training leaves it, on fake CUDA."""
    from .synthetic import SD3_SCHEDULER
    from .sampling import denoise

    c = transformer.config
    embeds, pooled = torch.zeros(1, text_tokens, c.joint_attention_dim), torch.zeros(1, c.pooled_projection_dim)
    with audit:
        return denoise(transformer, SD3_SCHEDULER, embeds, pooled, embeds[0], pooled[0], resolution // 8,
                       resolution // 8, steps=1, guidance=4.0, seed=0, dtype=dtype)


