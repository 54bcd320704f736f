"""KID (unbiased polynomial-kernel MMD) and the bootstrap intervals over images for FID/KID."""

import pytest
import torch
from helpers_metrics import frechet_distance, kernel_distance
from torch import nn

from tdd.metrics import FIDScorer, MetricSuite
from tdd.metrics.bootstrap import (
    centred_interval,
    fid_interval,
    fid_resampled,
    kid_interval,
    resample_counts,
)
from tdd.metrics.fid import NO_FEATURES
from tdd.metrics.kid import check_kid_settings, kid, kid_resampled, mmd2_unbiased

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gaussian(n, d, shift=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_kid_equals_the_pairwise_formula():
    a, b = gaussian(20, 5, 0.3, seed=1), gaussian(30, 5, seed=2)
    assert mmd2_unbiased(a, b) == pytest.approx(kernel_distance(a, b), rel=1e-9)
    assert kid(a, b, subset_size=30) == pytest.approx(kernel_distance(a, b), rel=1e-9)
    # subsets of at most 25: the mean of the subsets' estimates, drawn with the generator
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(7):
        i, j = torch.randperm(20, generator=g)[:20], torch.randperm(30, generator=g)[:25]
        expected.append(kernel_distance(a[i], b[j]))
    got = kid(a, b, subsets=7, subset_size=25, generator=torch.Generator().manual_seed(5))
    assert got == pytest.approx(sum(expected) / 7, rel=1e-9)


def test_kid_of_paired_sets_leaves_out_the_matched_pairs():
    """Generated image i shows the prompt of real image i: near-copies across the sets must
    not pull KID below 0 (the U-statistic over distinct indices)."""
    real = gaussian(64, 4, seed=1)
    near_copies = real + 0.05 * gaussian(64, 4, seed=2)
    assert abs(mmd2_unbiased(near_copies, real)) < 0.05
    assert mmd2_unbiased(near_copies, real) == pytest.approx(
        kernel_distance(near_copies, real), rel=1e-9)
    counts = torch.ones(1, 64, dtype=torch.long)
    assert float(kid_resampled(near_copies, real, counts)) == pytest.approx(
        mmd2_unbiased(near_copies, real))


def test_kid_is_unbiased_on_small_sets_where_fid_is_not():
    """Pairs of 12-image sets from one distribution: KID averages to 0, FID stays far above."""
    kids, fids = [], []
    for k in range(150):
        a, b = gaussian(12, 3, seed=2 * k), gaussian(12, 3, seed=2 * k + 1)
        kids.append(mmd2_unbiased(a, b))
        fids.append(frechet_distance(a, b))
    kids = torch.tensor(kids)
    assert abs(kids.mean()) < 3 * kids.std() / len(kids) ** 0.5
    assert torch.tensor(fids).mean() > 0.5  # the FID of equal distributions is 0


def test_resampled_scores_equal_the_scores_of_the_resampled_sets():
    x, ref = gaussian(15, 4, 0.5, 1.5, seed=3), gaussian(40, 4, seed=4)
    counts = resample_counts(15, 3, torch.Generator().manual_seed(0))
    assert (counts.sum(1) == 15).all() and (counts >= 0).all()
    fids = fid_resampled(x, ref.mean(0), torch.cov(ref.T), counts)
    kids = kid_resampled(x, ref, counts)
    for row, fid_value, kid_value in zip(counts, fids, kids):
        drawn = x[torch.repeat_interleave(torch.arange(15), row)]
        assert float(fid_value) == pytest.approx(frechet_distance(drawn, ref), rel=1e-6)
        assert float(kid_value) == pytest.approx(kernel_distance(drawn, ref), rel=1e-8)
    ones = torch.ones(1, 15, dtype=torch.long)  # every image once: the plain estimates
    assert float(kid_resampled(x, ref, ones)) == pytest.approx(mmd2_unbiased(x, ref))


def test_fid_interval_stays_at_or_above_zero():
    """Near-identical sets: the centred interval would reach below 0; FID cannot."""
    ref = gaussian(400, 3, seed=9)
    x = gaussian(40, 3, seed=10)
    counts = resample_counts(40, 200, torch.Generator().manual_seed(0))
    estimate = float(fid_resampled(x, ref.mean(0), torch.cov(ref.T), torch.ones(1, 40).long()))
    low, high = fid_interval(x, ref.mean(0), torch.cov(ref.T), estimate, counts)
    assert low == 0.0 and high > estimate


def test_centred_interval():
    resampled = torch.arange(1001, dtype=torch.float64)  # median 500, 2.5 % 25, 97.5 % 975
    assert centred_interval(resampled, 100.0) == pytest.approx([100 - 475, 100 + 475])


def coverage(score, truth, repeats=50, n=60, draws=150):
    """Share of repeats whose interval covers ``truth``; each repeat draws a new generated set."""
    hits = 0
    for k in range(repeats):
        x = gaussian(n, 3, 0.4, 1.2, seed=100 + k)
        counts = resample_counts(n, draws, torch.Generator().manual_seed(k))
        low, high = score(x, counts)
        hits += low <= truth <= high
    return hits / repeats


def test_fid_interval_covers_the_expected_fid_at_the_nominal_rate():
    ref = gaussian(2000, 3, seed=9)
    mean, cov = ref.mean(0), torch.cov(ref.T)

    def fid(x):
        return float(fid_resampled(x, mean, cov, torch.ones(1, len(x), dtype=torch.long)))
    truth = sum(fid(gaussian(60, 3, 0.4, 1.2, seed=10_000 + k)) for k in range(200)) / 200
    rate = coverage(lambda x, c: fid_interval(x, mean, cov, fid(x), c), truth)
    assert 0.85 <= rate <= 1.0, rate


def test_kid_interval_covers_the_true_kid_at_the_nominal_rate():
    ref = gaussian(150, 3, seed=9)
    truth = sum(mmd2_unbiased(gaussian(60, 3, 0.4, 1.2, seed=10_000 + k), ref)
                for k in range(300)) / 300
    rate = coverage(lambda x, c: kid_interval(x, ref, mmd2_unbiased(x, ref), c), truth)
    assert 0.85 <= rate <= 1.0, rate


class Identity(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_suite_reports_kid_and_intervals_reproducibly():
    real, fake = gaussian(50, 6, seed=1), gaussian(40, 6, 0.5, seed=2)
    suite = MetricSuite(fid=FIDScorer(Identity(), kid_subsets=4, kid_subset_size=45))
    suite.set_reference("real", real)
    suite.update(fake, [""] * 40)
    plain = suite.compute()
    assert set(plain) == {"fid", "kid"}  # no intervals unless asked
    out = suite.compute(bootstrap_draws=50, generator=torch.Generator().manual_seed(3))
    again = suite.compute(bootstrap_draws=50, generator=torch.Generator().manual_seed(3))
    other = suite.compute(bootstrap_draws=50, generator=torch.Generator().manual_seed(4))
    assert out == again and out["fid_ci"] != other["fid_ci"]
    assert 0 <= out["fid_ci"][0] < out["fid"] < out["fid_ci"][1]
    assert out["kid_ci"][0] < out["kid"] < out["kid_ci"][1]
    # cached statistics carry no features: FID and its interval, KID says why it is missing
    scorer = FIDScorer(Identity())
    scorer.set_reference_statistics(real.mean(0), torch.cov(real.T), 50)
    cached = MetricSuite(fid=scorer)
    cached.update(fake, [""] * 40)
    row = cached.compute(bootstrap_draws=20)
    assert row["kid"] == NO_FEATURES and "kid_ci" not in row
    assert row["fid"] == pytest.approx(plain["fid"], rel=1e-6) and len(row["fid_ci"]) == 2
    # more generated images than one KID subset: no KID interval (its kernel matrix is N x N)
    small = MetricSuite(fid=FIDScorer(Identity(), kid_subsets=2, kid_subset_size=30))
    small.set_reference("real", real)
    small.update(fake, [""] * 40)
    row = small.compute(bootstrap_draws=20)
    assert isinstance(row["kid"], float) and "kid_ci" not in row and "fid_ci" in row


@pytest.mark.parametrize("subsets, size", [(0, 10), (3, 1), (2.5, 10), (True, 10)])
def test_kid_settings_are_checked(subsets, size):
    with pytest.raises(ValueError, match=r"metrics\.kid_subset"):
        check_kid_settings(subsets, size)
