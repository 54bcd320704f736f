import random

import pytest
import torch

from tdd.bench import run, scripts_target
from tdd.strategies import TDDTarget


def test_scripts_target_selection_has_the_same_support_as_the_vectorised_one():
    """Per source index, both select from the same set of target timesteps, with the same
    share of s = 0 overall."""
    strategy = TDDTarget(num_ddim_timesteps=250, eta_max=0.0)  # s = tau: a finite support
    index = torch.arange(250).repeat(40)
    ours = strategy.sample(index, generator=torch.Generator().manual_seed(0))
    theirs = scripts_target(strategy, index, random.Random(0))
    t_prev = strategy.grid.previous(index)
    assert torch.all(theirs <= t_prev) and torch.all(theirs >= 0)
    for i in (0, 1, 30, 62, 100, 187, 249):
        support = {int(v) for v in ours[index == i].unique()}
        assert support == {int(v) for v in theirs[index == i].unique()}, i
    # the window written out: M in [max(u - 260, 0), u], u = max{m in M: m <= t_prev}
    # (i = 249: t_prev = 995, u = 875; i = 62: t = 251, t_prev = 247, u = 199)
    assert set(theirs[index == 249].tolist()) == {627, 667, 715, 751, 799, 835, 859, 875}
    assert set(theirs[index == 62].tolist()) == {0, 127, 143, 167, 199}
    with_offset = TDDTarget(num_ddim_timesteps=250)
    ours = with_offset.sample(index, generator=torch.Generator().manual_seed(0))
    theirs = scripts_target(with_offset, index, random.Random(0))
    assert abs((theirs == 0).double().mean() - (ours == 0).double().mean()) < 0.03


@pytest.mark.slow
def test_benchmark_reports_every_ratio():
    report = run("tiny", batch_size=2, repeats=1, images=2, device="cpu")
    assert set(report["steps"]) == {"tdd", "lcm", "tcd", "pcm"}
    for row in report["steps"].values():
        assert row["framework_s"] > 0 and row["floor_s"] > 0 and row["reference_s"] > 0
    assert set(report["sampling_speedup_vs_teacher"]) == {"tdd@4", "tdd@8", "tcd@4"}
    assert report["peak_memory_mb"] > 0 and report["teacher_load_s"] > 0


@pytest.mark.slow
def test_adversarial_benchmark_reports_the_step_time_ratios():
    from tdd.bench_adversarial import run as run_adversarial

    report = run_adversarial("tiny", batch_size=2, steps=6, device="cpu")
    assert report["plain_step_s"] > 0 and report["discriminator_step_s"] > 0
    ratio = (report["discriminator_step_s"] + report["student_step_s"]) / 2
    assert report["adversarial_over_plain"] == pytest.approx(ratio / report["plain_step_s"])
    assert report["per_student_update_over_plain"] == pytest.approx(
        2 * report["adversarial_over_plain"])
