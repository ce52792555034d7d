"""bf16 weights trained without master copies: stochastic rounding keeps small updates that plain bf16 loses."""
import copy

import pytest
import torch

from train.bf16_optim import AdamWStochasticBf16, stochastic_round_


def test_rounding_lands_on_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * 3
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(1))
    # x's two bf16 neighbours: its bits cut to bf16's (towards zero), and the next value away from zero.
    toward_zero = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    away = (toward_zero.view(torch.int32) + (1 << 16)).view(torch.float32)
    assert bool(((out.float() == toward_zero) | (out.float() == away)).all())
    assert 0.3 < (out.float() == away).float().mean().item() < 0.7
    assert bool(((out.float() - x).abs() < x.abs() * 2 ** -7 + 1e-30).all())
    # Mean error over many draws of one value: far below bf16's rounding step there.
    v = torch.full((100_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to the next bf16 value (1 + 2^-7)
    r = torch.empty_like(v, dtype=torch.bfloat16)
    stochastic_round_(r, v, torch.Generator().manual_seed(2))
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert r.float().mean().item() == pytest.approx(1.0 + 2 ** -9, abs=2e-5)
    neg = torch.empty_like(v, dtype=torch.bfloat16)
    stochastic_round_(neg, -v, torch.Generator().manual_seed(2))
    assert neg.float().mean().item() == pytest.approx(-(1.0 + 2 ** -9), abs=2e-5)
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    got = torch.empty_like(special, dtype=torch.bfloat16)
    stochastic_round_(got, special)
    assert got.float().tolist() == special.tolist()


def _train(opt_cls, dtype, steps=1500, **kw):
    """A constant gradient at lr 2e-4: Adam moves each weight ~2e-4 per step, a fortieth of bf16's step at 1.0."""
    torch.manual_seed(0)
    w = torch.nn.Parameter((1 + torch.rand(1024) * 0.5).to(torch.bfloat16).to(dtype))  # the same start in both
    start = w.detach().float().clone()
    opt = opt_cls([w], lr=2e-4, weight_decay=0.0, **kw)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return start, w.detach().float()


def test_many_tiny_updates_accumulate_like_fp32_where_plain_bf16_stalls():
    start, fp32 = _train(torch.optim.AdamW, torch.float32)
    moved = (start - fp32).mean().item()
    assert moved == pytest.approx(0.3, rel=0.02)
    start16, plain = _train(torch.optim.AdamW, torch.bfloat16)
    assert (start16 - plain).abs().max().item() == 0.0  # every update rounded away
    start16, ours = _train(AdamWStochasticBf16, torch.bfloat16)
    # On average the weights move as fp32's do (within 2% of the distance); each one on its own is a random walk
    # around fp32's path, one bf16 step (2^-7) wide at probability ~1/40 a step: ~0.05 after 1500 steps.
    assert (start16 - ours).mean().item() == pytest.approx(moved, rel=0.02)
    assert (ours - fp32).pow(2).mean().sqrt().item() < 0.07
    # fp32 parameters: the same update as torch's AdamW.
    _, same = _train(AdamWStochasticBf16, torch.float32, steps=50)
    _, ref = _train(torch.optim.AdamW, torch.float32, steps=50)
    assert torch.allclose(same, ref, rtol=0, atol=1e-6)


def test_a_resumed_run_rounds_as_the_uninterrupted_one():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512).to(torch.bfloat16))
    opt = AdamWStochasticBf16([w], lr=1e-3, seed=7)
    grads = [torch.randn(512, generator=torch.Generator().manual_seed(i)) for i in range(20)]

    def steps(param, optimizer, gs):
        for g in gs:
            param.grad = g.to(param.dtype)
            optimizer.step()

    steps(w, opt, grads[:10])
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    steps(w, opt, grads[10:])
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = AdamWStochasticBf16([w2], lr=1e-3, seed=7)
    opt2.load_state_dict(saved)
    assert opt2.state[w2]["exp_avg"].dtype == torch.float32
    steps(w2, opt2, grads[10:])
    assert torch.equal(w2, w)


def _per_weight(kind):
    from train.config import TrainLoopConfig
    from train.optim import make_optimizer

    def make(params, lr, weight_decay, seed=0):
        t = TrainLoopConfig(optimizer=kind, lr=lr, weight_decay=weight_decay, seed=seed)
        return make_optimizer(params, t)
    return make


@pytest.mark.parametrize("kind", ["adamw8bit", "adafactor"])
def test_other_optimizers_step_bf16_weights_one_at_a_time_and_keep_tiny_updates(kind):
    """bitsandbytes' 8-bit AdamW and Adafactor on bf16 weights: each steps an fp32 copy of one weight and the
    result comes back by stochastic rounding, so updates of a fortieth of a bf16 step still move the weights,
    as far as the same optimizer moves fp32 weights; a resume continues with the same bits."""
    from train.bf16_optim import PerWeightBf16

    make = _per_weight(kind)
    start, fp32 = _train(make, torch.float32, steps=600)
    start16, ours = _train(make, torch.bfloat16, steps=600)
    moved = (start - fp32).mean().item()
    assert moved > 0.05  # ~2e-4 a step, where one bf16 step at 1.0-1.5 is 2^-7 to 2^-6
    assert (start16 - ours).mean().item() == pytest.approx(moved, rel=0.03)
    w = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16))
    opt = make([w], lr=1e-3, weight_decay=0.0, seed=7)
    assert isinstance(opt, PerWeightBf16)
    grads = [torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    for g in grads[:6]:
        w.grad = g.to(torch.bfloat16)
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[6:]:
        w.grad = g.to(torch.bfloat16)
        opt.step()
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = make([w2], lr=1e-3, weight_decay=0.0, seed=7)
    opt2.load_state_dict(saved)
    for g in grads[6:]:
        w2.grad = g.to(torch.bfloat16)
        opt2.step()
    assert torch.equal(w2, w)


@pytest.mark.parametrize("kind,dtype", [("adamw", torch.bfloat16), ("adamw", torch.float32),
                                        ("adafactor", torch.bfloat16)])
def test_the_fused_step_leaves_a_weight_with_a_non_finite_gradient_as_it_was(kind, dtype):
    """train.fused_step: a weight whose gradient is not finite keeps its exact value (weight decay included), the
    others take their update, and the next finite step moves it to a finite value (its state took no NaN)."""
    from train.config import TrainLoopConfig
    from train.optim import make_optimizer
    from train.step import FusedUpdates

    g = torch.Generator().manual_seed(0)
    good = torch.nn.Parameter(torch.randn(64, 64, generator=g).to(dtype))
    bad = torch.nn.Parameter(torch.randn(64, generator=g).to(dtype))
    opt = make_optimizer([good, bad], TrainLoopConfig(optimizer=kind, lr=1e-2, weight_decay=0.1, fused_step=True))
    fused = FusedUpdates(opt, [good, bad], max_norm=1.0)
    x = torch.randn(64, generator=g)
    good_before, bad_before = good.detach().clone(), bad.detach().clone()
    ((good.float() @ x).sum() + (bad.float() * float("inf")).sum()).backward()
    assert not torch.isfinite(fused.finish())
    assert torch.equal(bad, bad_before) and not torch.equal(good, good_before)
    assert good.grad is None and bad.grad is None  # each freed in backward
    ((good.float() @ x).sum() + (bad.float() * x).sum()).backward()
    assert torch.isfinite(fused.finish())
    assert not torch.equal(bad, bad_before) and torch.isfinite(bad).all()
