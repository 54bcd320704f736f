"""tdd.stats on synthetic results with known means and spreads."""

import math

import numpy as np
import pytest
import torch

from tdd.stats import (
    Comparison,
    bootstrap_interval,
    compare_seeds,
    intervals_overlap,
    mean_interval,
    paired_images,
    summarize,
    t_cdf,
    t_quantile,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_summary_counts_missing_runs_and_metrics_without_inventing_them():
    s = summarize({"seed0": 1.0, "seed1": 3.0, "seed2": 2.0})
    assert (s.mean, s.std, s.n, s.missing) == (2.0, 1.0, 3, ())
    s = summarize({"seed0": 1.0, "seed1": None, "seed2": "not computed: no real images",
                   "seed3": 3.0, "seed4": float("nan")})
    assert (s.mean, s.n, s.total) == (2.0, 2, 5)
    assert s.missing == ("seed1: no value (crashed, not run, or metric not recorded)",
                         "seed2: not computed: no real images",
                         "seed4: not a finite number (nan)")
    empty = summarize({"seed0": None})
    assert math.isnan(empty.mean) and empty.n == 0 and len(empty.missing) == 1
    assert math.isnan(summarize({"seed0": 4.0}).std)  # one seed: no spread, not 0


def test_t_distribution_matches_its_tables():
    table = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=2e-3)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=2e-3)
    assert t_cdf(0.0, 3) == pytest.approx(0.5) and t_cdf(-2.776, 4) == pytest.approx(0.025, 1e-3)


def test_seed_interval_covers_the_true_mean_at_the_nominal_rate():
    """3 seeds from N(5, 2^2): the t interval covers 5 in about 95 % of 600 studies."""
    rng = np.random.default_rng(0)
    hits = [low <= 5 <= high for low, high in
            (mean_interval(rng.normal(5, 2, 3)) for _ in range(600))]
    assert 0.93 <= np.mean(hits) <= 0.97
    assert all(math.isnan(v) for v in mean_interval([1.0]))


def test_image_bootstrap_covers_the_true_mean_at_the_nominal_rate():
    """200 per-image scores from a skewed distribution (exponential, mean 1)."""
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(300):
        low, high = bootstrap_interval(rng.exponential(1.0, 200), 1000, generator=generator)
        hits.append(low <= 1 <= high)
    assert 0.90 <= np.mean(hits) <= 0.98


def test_paired_images_flag_a_constant_shift_and_rarely_a_null_one():
    rng = np.random.default_rng(2)
    generator = torch.Generator().manual_seed(0)
    prompt_effect = rng.normal(0, 1.0, 256)  # images differ a lot, arms by a little
    a = prompt_effect + rng.normal(0, 0.1, 256)
    shifted = paired_images(a, a + 0.05 + rng.normal(0, 0.1, 256), generator=generator)
    assert shifted.differs and shifted.p_value < 0.01
    assert shifted.difference == pytest.approx(0.05, abs=0.02) and shifted.n == 256
    # unpaired, the same shift is lost in the spread between prompts
    unpaired = paired_images(a, rng.permutation(a) + 0.05, generator=generator)
    assert not unpaired.differs
    false_alarms = [paired_images(a, a + rng.normal(0, 0.1, 256), 400,
                                  generator=generator).differs for _ in range(200)]
    assert np.mean(false_alarms) <= 0.1
    with pytest.raises(ValueError, match="not the same set"):
        paired_images(a, a[:10])


def test_seed_comparisons_flag_a_constant_shift():
    rng = np.random.default_rng(3)
    base = {s: 10 + rng.normal(0, 1.0) for s in range(3)}  # seeds differ a lot
    shifted = {s: v + 0.5 + rng.normal(0, 0.05) for s, v in base.items()}
    paired = compare_seeds(base, shifted)
    assert paired.method == "paired seeds: t" and paired.differs and paired.n == 3
    assert paired.difference == pytest.approx(0.5, abs=0.1)
    welch = compare_seeds(base, {s + 10: v for s, v in shifted.items()})  # no shared seeds
    assert welch.method == "Welch t" and not welch.differs  # the seed spread hides it
    far = compare_seeds(base, {s + 10: v + 20 for s, v in base.items()})
    assert far.differs and far.p_value < 0.001
    alone = compare_seeds({0: 1.0}, {0: 5.0})
    assert alone.method.startswith("fewer than 2") and not alone.differs
    null = [compare_seeds({s: rng.normal() for s in range(4)},
                          {s: rng.normal() for s in range(4)}).differs for _ in range(300)]
    assert 0.01 <= np.mean(null) <= 0.1  # about 5 % false alarms


def test_comparison_and_overlap():
    assert Comparison(1.0, (0.2, 1.8), 0.01, 3, "x").differs
    assert not Comparison(1.0, (-0.2, 1.8), 0.2, 3, "x").differs
    assert Comparison(-1.0, (-1.8, -0.1), 0.01, 3, "x").differs
    assert intervals_overlap([0, 2], [1.5, 3]) and not intervals_overlap([0, 1], [1.5, 3])
