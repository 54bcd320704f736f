import pytest

from tdd.bench import run, scripts_target
from tdd.strategies import TDDTarget


def test_scripts_target_selection_has_the_same_support_as_the_vectorised_one():
    import random

    import torch

    strategy = TDDTarget(num_ddim_timesteps=250)
    index = torch.arange(250).repeat(20)
    ours = strategy.sample(index, generator=torch.Generator().manual_seed(0))
    theirs = scripts_target(strategy, index, random.Random(0))
    t_prev = strategy.grid.previous(index)
    assert torch.all(theirs <= t_prev) and torch.all(theirs >= 0)
    assert abs((theirs == 0).double().mean() - (ours == 0).double().mean()) < 0.03


@pytest.mark.slow
def test_benchmark_reports_every_ratio():
    report = run("tiny", batch_size=2, repeats=1, images=2, device="cpu")
    assert set(report["steps"]) == {"tdd", "lcm", "tcd", "pcm"}
    for row in report["steps"].values():
        assert row["framework_s"] > 0 and row["floor_s"] > 0 and row["reference_s"] > 0
    assert set(report["sampling_speedup_vs_teacher"]) == {"tdd@4", "tdd@8", "tcd@4"}
    assert report["peak_memory_mb"] > 0
