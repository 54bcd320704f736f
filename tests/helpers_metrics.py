"""A small, deterministic metric suite for evaluation tests (no shipped assets needed), and
the FID formula written independently of the package."""

import torch
from torch import nn

from tdd.metrics import FIDScorer, MetricSuite


class MeanBrightness(nn.Module):
    """A per-image score that depends on the images only."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def tiny_suite() -> MetricSuite:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten())
    return MetricSuite(fid=FIDScorer(features), scorers={"brightness": MeanBrightness()})


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The FID formula written independently of torchmetrics: Frechet distance between the
    Gaussians fitted to two feature sets, ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2)``
    with the symmetric form ``(C_a^1/2 C_b C_a^1/2)^1/2`` of the root."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def kernel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID written out pair by pair: the unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``,
    averaging k over the pairs of distinct images within each set and over the cross pairs
    (of distinct indices when the sets are equally large: image i of each is the same prompt)."""
    a, b = a.double(), b.double()
    d = a.shape[1]

    def k(x, y):
        return float((x @ y / d + 1) ** 3)

    within_a = [k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j]
    within_b = [k(b[i], b[j]) for i in range(len(b)) for j in range(len(b)) if i != j]
    across = [k(x, y) for i, x in enumerate(a) for j, y in enumerate(b)
              if len(a) != len(b) or i != j]
    return (sum(within_a) / len(within_a) + sum(within_b) / len(within_b)
            - 2 * sum(across) / len(across))
