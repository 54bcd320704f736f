"""Sharpness: the high-frequency share of the luma energy relative to the real renders."""

import pytest
import torch
import torch.nn.functional as F

from tdd.data.shapes import reference_renders
from tdd.metrics.sharpness import Sharpness, high_frequency_share


def blur(images, sigma):
    x = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 7): along the rows
    images = F.conv2d(F.pad(images, (3, 3, 0, 0), mode="reflect"), kernel, groups=3)
    return F.conv2d(F.pad(images, (0, 0, 3, 3), mode="reflect"), kernel.mT, groups=3)


@pytest.fixture(scope="module")
def renders():
    return reference_renders("val", 64), reference_renders("val", 64, variant=1)


def test_blur_lowers_and_noise_raises_sharpness(renders):
    real, other = renders
    score = Sharpness()
    score.set_reference(real)
    assert float(score(real).mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(score(other).mean()) == pytest.approx(1.0, abs=0.1)  # other renders: alike
    blurred = [float(score(blur(real, s)).mean()) for s in (0.5, 0.8, 1.2)]
    assert 0.9 > blurred[0] > blurred[1] > blurred[2]  # more blur, less sharpness
    noise = 0.03 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    assert float(score((real + noise).clamp(0, 1)).mean()) > 1.2
    per_image = score(blur(real, 0.8))
    assert per_image.shape == (64,) and (per_image < score(real)).float().mean() > 0.9


def test_borders_add_no_false_edges():
    """A smooth ramp has almost no high-frequency energy: the image is mirrored, not wrapped
    around (wrapping would put a sharp edge between its first and last column)."""
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
    assert float(high_frequency_share(ramp)) < 1e-3
    stripes = (torch.arange(32) % 2).float().expand(1, 3, 32, 32)  # 2-pixel period: Nyquist
    assert float(high_frequency_share(stripes)) > 0.95
    assert float(high_frequency_share(torch.full((1, 3, 32, 32), 0.5))) == 0.0


def test_reference_and_cutoff_are_required():
    with pytest.raises(RuntimeError, match="no reference"):
        Sharpness()(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="sharpness_cutoff"):
        Sharpness(cutoff=1.5)
    with pytest.raises(ValueError, match="no high-frequency energy"):
        Sharpness().set_reference(torch.full((2, 3, 8, 8), 0.5))
