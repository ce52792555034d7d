"""The flow-matching objective against independent computations and against diffusers."""
import math

import pytest
import torch

from train import flow


def test_sigma_table_equals_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        table = flow.sigma_table(1000, shift)
        assert torch.allclose(table, s.sigmas[:1000], atol=1e-7)
        assert torch.allclose(table * 1000, s.timesteps, atol=1e-4)
    # Independent: the shift formula at a few points.
    t = flow.sigma_table(4, 3.0)
    expect = [3 * x / (1 + 2 * x) for x in (1.0, 0.75, 0.5, 0.25)]
    assert torch.allclose(t, torch.tensor(expect))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_density_matches_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_u(scheme, 64, torch.Generator().manual_seed(1), 0.3, 1.2, 1.29)
    g = torch.Generator().manual_seed(1)
    if scheme == "logit_normal":  # diffusers draws N(m, s) directly; ours scales a standard normal
        z = torch.randn(64, generator=g) * 1.2 + 0.3
        ref = 1 / (1 + torch.exp(-z))
    else:
        ref = compute_density_for_timestep_sampling(scheme, 64, 0.3, 1.2, 1.29, generator=g)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_sigmas_index_like_diffusers():
    table = flow.sigma_table(1000, 3.0)
    u = torch.tensor([0.0, 0.5, 0.9999])
    assert flow.sigmas_for(u, table).tolist() == [table[0].item(), table[500].item(), table[999].item()]


def test_weighting_matches_formulas_and_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.loss_weighting("sigma_sqrt", sigma), torch.tensor([100.0, 4.0, 1 / 0.81]))
    cos = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)]
    assert torch.allclose(flow.loss_weighting("cosmap", sigma), torch.tensor(cos))
    assert torch.equal(flow.loss_weighting("none", sigma), torch.ones(3))
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        assert torch.allclose(flow.loss_weighting(scheme, sigma), compute_loss_weighting_for_sd3(scheme, sigma).float())


def _reference_loss(out, x0, noise, sigma, weighting, precondition):
    """The formulas written out sample by sample, element by element."""
    total = 0.0
    for b in range(x0.shape[0]):
        s = sigma[b].item()
        w = {"none": 1.0, "sigma_sqrt": s ** -2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s * s))}[weighting]
        acc = 0.0
        for o, x, n in zip(out[b].flatten().tolist(), x0[b].flatten().tolist(), noise[b].flatten().tolist()):
            noisy = (1 - s) * x + s * n
            pred, target = (o * -s + noisy, x) if precondition else (o, n - x)
            acc += w * (pred - target) ** 2
        total += acc / x0[b].numel()
    return total / x0.shape[0]


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [True, False])
def test_loss_equals_straightforward_computation(weighting, precondition):
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64)
    noisy = flow.noisy_latents(x0, noise, sigma)
    assert torch.allclose(noisy[1], 0.45 * x0[1] + 0.55 * noise[1])
    got = flow.flow_matching_loss(out, x0, noise, noisy, sigma, weighting, precondition).item()
    assert got == pytest.approx(_reference_loss(out, x0, noise, sigma, weighting, precondition), rel=1e-5)


def test_model_latents_sample_the_posterior_then_shift_and_scale():
    mean, std = torch.full((2, 3), 0.5), torch.full((2, 3), 0.25)
    eps = torch.randn((2, 3), generator=torch.Generator().manual_seed(3))
    got = flow.model_latents(mean, std, eps, shift_factor=0.0609, scaling_factor=1.5305)
    assert torch.allclose(got, (0.5 + 0.25 * eps - 0.0609) * 1.5305)


def test_loss_change_at_equal_sigma_is_not_fooled_by_timestep_luck(tmp_path):
    import json

    from train.plot import change_at_equal_sigma, loss_by_sigma_png

    lines = []
    for step in range(1, 11):
        late = step > 5
        # Loss grows with sigma; the late half draws more high-sigma samples but is better at every sigma.
        sigmas = [0.15, 0.85, 0.85] if late else [0.15, 0.15, 0.85]
        losses = [(0.5 if late else 1.0) * (1 + 4 * s) for s in sigmas]
        lines.append({"step": step, "sigmas": sigmas, "losses": losses})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 11, "sigm')  # a torn last line
    raw_first = sum(sum(x["losses"]) for x in lines[:5]) / 15
    raw_last = sum(sum(x["losses"]) for x in lines[5:]) / 15
    assert raw_last > 0.6 * raw_first  # the raw mean barely moves...
    assert change_at_equal_sigma(str(path)) == pytest.approx(-0.5)  # ...the loss at equal sigma halved
    assert loss_by_sigma_png(str(path), str(tmp_path / "p.png")) is not None
