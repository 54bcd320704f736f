"""The one FID of the package (``FIDScorer``, torchmetrics' statistics) on features with a known
answer, and against the formula written independently in the tests."""

import pytest
import torch
from helpers_metrics import frechet_distance
from torch import nn

from tdd.metrics import FIDScorer


def fid(reference: torch.Tensor, generated: torch.Tensor) -> float:
    """FID with the inputs as their own features (3-d points standing for images)."""
    scorer = FIDScorer(nn.Identity(), batch_size=1000)
    scorer.set_reference(reference)
    return scorer.score(generated)


def test_fid_of_gaussians_with_known_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-3)
    assert fid(a, b) < 0.05
    assert fid(a, b + torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(4.0, abs=0.2)  # |shift|^2
    assert fid(a, 2 * b) == pytest.approx(3.0, abs=0.3)  # 3 * (2 - 1)^2


def test_fid_equals_the_independent_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 3, generator=g) @ torch.randn(3, 3, generator=g)
    b = torch.rand(300, 3, generator=g) * 3 - 1  # not Gaussian, other covariance
    assert fid(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-4)
