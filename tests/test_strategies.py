import pytest
import torch

from tdd.schedule import DistillationGrid
from tdd.strategies import LCMTarget, PCMTarget, TCDTarget, TDDTarget

TDD_250 = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715,
           751, 799, 835, 859, 875]
TDD_50 = [0, 139, 159, 179, 199, 259, 299, 339, 379, 399, 439, 499, 579, 599, 639, 679, 719,
          759, 799, 839, 859, 879]


def all_strategies(n):
    return [TDDTarget(num_ddim_timesteps=n), LCMTarget(num_ddim_timesteps=n),
            TCDTarget(num_ddim_timesteps=n), PCMTarget(num_ddim_timesteps=n)]


def test_tdd_candidates_are_the_published_sets():
    assert TDDTarget(num_ddim_timesteps=250).candidates.tolist() == TDD_250
    assert TDDTarget(num_ddim_timesteps=50).candidates.tolist() == TDD_50
    assert TDDTarget().candidates.dtype == torch.long


@pytest.mark.parametrize("n", [50, 250])
@pytest.mark.parametrize("strategy_index", range(4))
def test_target_lies_between_zero_and_t_prev(n, strategy_index):
    strategy = all_strategies(n)[strategy_index]
    index = torch.arange(n).repeat(40)
    s = strategy.sample(index, generator=torch.Generator().manual_seed(0))
    t_prev = DistillationGrid(1000, n).previous(index)
    assert s.dtype == torch.long and s.shape == index.shape
    assert torch.all(s >= 0) and torch.all(s <= t_prev)


@pytest.mark.parametrize("strategy_index", range(4))
def test_same_generator_gives_same_targets(strategy_index):
    strategy = all_strategies(50)[strategy_index]
    index = torch.randint(0, 50, (512,), generator=torch.Generator().manual_seed(3))
    draw = lambda seed: strategy.sample(index, generator=torch.Generator().manual_seed(seed))  # noqa
    assert torch.equal(draw(7), draw(7))
    if isinstance(strategy, (TCDTarget, TDDTarget)):  # the random strategies use the generator
        assert not torch.equal(draw(7), draw(8))


def test_tdd_jump_distribution_matches_the_scripts():
    strategy = TDDTarget(num_ddim_timesteps=250)
    g = torch.Generator().manual_seed(0)
    index = strategy.grid.sample_index(200_000, g)
    s = strategy.sample(index, generator=g)
    jump = (strategy.grid[index] - s).double()
    assert abs(jump.mean().item() - 184) < 4
    assert abs((s == 0).double().mean().item() - 0.17) < 0.01
    # a different generator stream gives different draws
    assert not torch.equal(s[:1000], strategy.sample(index[:1000], generator=g))


def test_tdd_window_and_offset():
    strategy = TDDTarget(num_ddim_timesteps=250, window=0, eta_max=0.0)
    index = torch.arange(250)
    t_prev = strategy.grid.previous(index)
    m = strategy.candidates
    expected = torch.stack([m[m <= tp].max() for tp in t_prev])
    assert torch.equal(strategy.sample(index, generator=torch.Generator()), expected)


def test_lcm_targets_zero():
    assert torch.equal(LCMTarget().sample(torch.arange(50)), torch.zeros(50, dtype=torch.long))


def test_tcd_is_uniform_over_zero_and_grid_points_up_to_t_prev():
    strategy = TCDTarget(num_ddim_timesteps=50)
    i = 9  # t = 199, t_prev = 179
    s = strategy.sample(torch.full((50_000,), i), generator=torch.Generator().manual_seed(0))
    support = [0] + strategy.grid.timesteps[:i].tolist()
    values, counts = s.unique(return_counts=True)
    assert values.tolist() == support
    assert torch.all((counts / 50_000 - 1 / len(support)).abs() < 0.01)


def test_pcm_edges_and_phases():
    strategy = PCMTarget(num_ddim_timesteps=50, num_phases=4)
    assert strategy.edge_timesteps.tolist() == [0, 239, 499, 739]
    s = strategy.sample(torch.tensor([0, 11, 12, 24, 25, 36, 37, 49]))
    assert s.tolist() == [0, 0, 239, 239, 499, 499, 739, 739]


@pytest.mark.parametrize(
    "build, setting",
    [
        (lambda: TDDTarget(k_min=9, k_max=8), "k_min"),
        (lambda: TDDTarget(eta_max=1.5), "eta_max"),
        (lambda: TDDTarget(eta_max=-0.1), "eta_max"),
        (lambda: TDDTarget(window=-1), "window"),
        (lambda: PCMTarget(num_ddim_timesteps=50, num_phases=51), "num_phases"),
        (lambda: TCDTarget(num_ddim_timesteps=2000), "num_ddim_timesteps"),
        (lambda: LCMTarget(sigma_data=0), "sigma_data"),
    ],
)
def test_bad_settings_are_named(build, setting):
    with pytest.raises(ValueError, match=setting):
        build()


def test_out_of_grid_index_is_rejected():
    with pytest.raises(ValueError, match="source_index"):
        TCDTarget(num_ddim_timesteps=50).sample(torch.tensor([50]))
