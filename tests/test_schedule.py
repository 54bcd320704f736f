import pytest
import torch
from diffusers import DDPMScheduler

from tdd.boundary import lcm_scalings
from tdd.losses import L2Loss, PseudoHuberLoss
from tdd.prediction import ddim_map, renoise, to_x0_eps
from tdd.schedule import (
    SD_SCHEDULER,
    DistillationGrid,
    NoiseSchedule,
    alphas_cumprod_from_config,
)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(kind):
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=kind)
    ours = alphas_cumprod_from_config(config)
    theirs = DDPMScheduler(**config).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_unknown_beta_schedule_is_named():
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        alphas_cumprod_from_config({"beta_schedule": "cosine"})


def test_grid_and_k_step_schedules():
    grid = DistillationGrid(1000, 250)
    assert grid.skip == 4 and grid.timesteps[0] == 3 and grid.timesteps[-1] == 999
    assert grid.schedule(4).tolist() == [999, 751, 499, 251]
    assert grid.schedule(8).tolist() == [999, 875, 751, 627, 499, 375, 251, 127]
    small = DistillationGrid(1000, 50)
    assert small.timesteps[:3].tolist() == [19, 39, 59]
    assert small.previous(torch.tensor([0, 1, 49])).tolist() == [0, 19, 979]
    with pytest.raises(ValueError, match="num_steps=51"):
        small.schedule(51)
    with pytest.raises(ValueError, match="num_ddim_timesteps=0"):
        DistillationGrid(1000, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversion_recovers_x0_and_eps(prediction_type):
    g = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = alpha * x0 + sigma * eps
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
    x0_hat, eps_hat = to_x0_eps(output[prediction_type], x_t, alpha, sigma, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        to_x0_eps(eps, x_t, alpha, sigma, "flow")


def test_ddim_map_is_identity_at_the_same_timestep():
    g = torch.Generator().manual_seed(1)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    x_t, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 19, 511, 999])
    alpha, sigma = schedule.coefficients(t, x_t)
    x0, eps = to_x0_eps(eps, x_t, alpha, sigma, "epsilon")
    assert torch.allclose(ddim_map(x0, eps, t, schedule), x_t, atol=1e-5)
    # and it moves the sample when s != t
    assert not torch.allclose(ddim_map(x0, eps, t // 2, schedule), x_t, atol=1e-2)


def test_renoise_has_the_forward_marginal():
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(2)
    x_s = torch.zeros(20000, 1)
    s, t = torch.full((20000,), 200), torch.full((20000,), 600)
    x_t = renoise(x_s, s, t, schedule, torch.randn(20000, 1, generator=g))
    abar = schedule.alphas_cumprod
    expected = (1 - abar[600] / abar[200]).sqrt().item()
    assert abs(x_t.std().item() - expected) < 0.02
    assert torch.equal(renoise(x_s[:2] + 1, s[:2], s[:2], schedule, torch.ones(2, 1)), x_s[:2] + 1)


def test_lcm_boundary_scalings():
    c_skip, c_out = lcm_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert torch.all(c_skip[1:] < 1e-2) and torch.all(c_out[1:] > 0.99)
    assert torch.allclose(c_skip + c_out**2, torch.ones(3, dtype=torch.float64))


def test_losses_are_per_sample():
    a = torch.zeros(3, 4, 2, 2)
    b = a.clone()
    b[1] += 1.0
    huber = PseudoHuberLoss(c=0.001)(a, b)
    assert huber.shape == (3,) and huber[0] == 0 and huber[2] == 0
    assert abs(huber[1].item() - (2**0.5 * 0 + (1 + 1e-6) ** 0.5 - 1e-3)) < 1e-6
    assert torch.equal(L2Loss()(a, b), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="loss.c"):
        PseudoHuberLoss(c=0)
