"""Bootstrap intervals over images for set-level scores (FID, KID) of one evaluated setting.

The generated images' features are resampled with replacement (an explicit generator) and the
score recomputed against the fixed reference. The interval is the percentile interval of the
resampled scores moved so that their median sits on the estimate: resampling duplicates
images, which lowers the features' diversity and shifts FID and KID upwards, while the spread
is what measures how much the score depends on which images were drawn. The interval therefore
describes the score at this number of images; FID's own small-sample bias, shared by arms
scored on equally many images, is not in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tdd.metrics.kid import kid_resampled

#: The nominal coverage of every interval the evaluation reports.
LEVEL = 0.95


def resample_counts(n: int, draws: int, generator: torch.Generator | None = None) -> Tensor:
    """(draws, n) multiplicities of n items resampled with replacement, one row per draw."""
    index = torch.randint(n, (draws, n), generator=generator)
    return torch.zeros(draws, n, dtype=torch.long).scatter_add_(1, index, torch.ones_like(index))


def centred_interval(resampled: Tensor, estimate: float, level: float = LEVEL) -> list[float]:
    """``[low, high]``: the resampled scores' percentile interval, shifted so that their
    median falls on ``estimate``."""
    alpha = (1 - level) / 2
    low, median, high = torch.quantile(
        resampled.double(), torch.tensor([alpha, 0.5, 1 - alpha], dtype=torch.float64))
    return [float(estimate - (median - low)), float(estimate + (high - median))]


def matrix_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def fid_resampled(
    generated: Tensor, mean: Tensor, cov: Tensor, counts: Tensor, chunk: int = 2**24
) -> Tensor:
    """(B,) FID of the generated features resampled with multiplicities ``counts`` (B, N)
    against reference statistics ``mean``, ``cov``: ``|mu_g - mu|^2 + tr(C_g) + tr(C)
    - 2 tr((C^1/2 C_g C^1/2)^1/2)``. With ``Y = X C^1/2`` computed once, ``C^1/2 C_g C^1/2 =
    A^T A`` for ``A = diag(c)^1/2 (Y - mu_Y) / (N - 1)^1/2``, whose eigenvalues are those of
    the smaller of ``A^T A`` (D x D) and ``A A^T`` (N x N); draws go in batches of about
    ``chunk`` numbers of ``A``."""
    x = generated.double()
    mean, cov = mean.double().to(x.device), cov.double().to(x.device)
    y = x @ matrix_sqrt(cov)
    n, dim = x.shape
    out = []
    for weights in counts.double().to(x.device).split(max(1, chunk // (n * dim))):
        mu, mu_y = weights @ x / n, weights @ y / n  # (b, D)
        a = (y - mu_y[:, None]) * (weights / (n - 1)).sqrt()[..., None]  # (b, N, D)
        gram = a @ a.mT if n <= dim else a.mT @ a
        middle = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1)
        trace_g = (weights @ x.square() - n * mu.square()).sum(-1) / (n - 1)
        out.append((mu - mean).square().sum(-1) + trace_g + cov.trace() - 2 * middle)
    return torch.cat(out)


def fid_interval(
    generated: Tensor, mean: Tensor, cov: Tensor, estimate: float, counts: Tensor
) -> list[float]:
    """The centred interval of FID, its lower end kept at 0 or above (a distance)."""
    low, high = centred_interval(fid_resampled(generated, mean, cov, counts), estimate)
    return [max(low, 0.0), high]


def kid_interval(
    generated: Tensor, reference: Tensor, estimate: float, counts: Tensor
) -> list[float]:
    return centred_interval(kid_resampled(generated, reference, counts), estimate)
