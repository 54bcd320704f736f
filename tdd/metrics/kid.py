"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", section 4).

KID is the unbiased estimate of the squared maximum mean discrepancy between two feature sets
under the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``; unlike FID it has no bias
from the number of images, so small sets compare fairly. As in the paper it is averaged over
random subsets (none when both sets fit in one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_kid_settings(subsets: int, subset_size: int) -> None:
    """``metrics.kid_subsets`` >= 1 and ``metrics.kid_subset_size`` >= 2, else a ValueError."""
    for name, value, low in (("kid_subsets", subsets, 1), ("kid_subset_size", subset_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"metrics.{name}={value!r} must be an integer >= {low}")


def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) kernel matrix ``(a . b / d + 1)^3`` of features (N, d) and (M, d), in float64."""
    return (a.double() @ b.double().T / a.shape[1] + 1) ** 3


def _off_diagonal_sum(features: Tensor, chunk: int = 2048) -> float:
    """Sum of ``k(x_i, x_j)`` over i != j, in row chunks (a 30K reference never makes 30K^2)."""
    total = 0.0
    for start in range(0, len(features), chunk):
        block = polynomial_kernel(features[start:start + chunk], features)
        total += float(block.sum() - block.diagonal(offset=start).sum())
    return total


def cross_means(generated: Tensor, reference: Tensor) -> Tensor:
    """(N,) mean kernel of each generated image with the reference images; for sets of equal
    size, leaving out the reference image of the same index (the U-statistic's pairs of
    distinct indices: a generated image and the real image of its own prompt are not
    independent, and counting them would pull KID below 0)."""
    k = polynomial_kernel(generated, reference)
    if len(generated) != len(reference):
        return k.mean(1)
    return (k.sum(1) - k.diagonal()) / (len(reference) - 1)


def mmd2_unbiased(generated: Tensor, reference: Tensor) -> float:
    """The unbiased MMD^2 estimate (pairs of distinct images only; see :func:`cross_means`)."""
    m, n = len(generated), len(reference)
    if min(m, n) < 2:
        raise ValueError(f"KID needs >= 2 images on each side, have {m} and {n}")
    gg = _off_diagonal_sum(generated) / (m * (m - 1))
    rr = _off_diagonal_sum(reference) / (n * (n - 1))
    return gg + rr - 2 * float(cross_means(generated, reference).mean())


def kid(
    generated: Tensor, reference: Tensor, subsets: int = 100, subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> float:
    """KID: the mean of ``mmd2_unbiased`` over ``subsets`` random subsets of at most
    ``subset_size`` images drawn from each side; a side that fits is used whole (so two sets
    that both fit give the single, lowest-variance estimate over all pairs)."""
    m, n = min(subset_size, len(generated)), min(subset_size, len(reference))
    if m == len(generated) and n == len(reference):
        return mmd2_unbiased(generated, reference)
    values = []
    for _ in range(subsets):
        g = torch.randperm(len(generated), generator=generator)[:m]
        r = torch.randperm(len(reference), generator=generator)[:n]
        values.append(mmd2_unbiased(generated[g.to(generated.device)],
                                    reference[r.to(reference.device)]))
    return sum(values) / len(values)


def kid_resampled(generated: Tensor, reference: Tensor, counts: Tensor) -> Tensor:
    """(B,) unbiased MMD^2 of the generated images resampled with multiplicities ``counts``
    (B, N) (each row sums to N) against the whole reference, from one pair of kernel matrices:
    for a resample, the sum over distinct positions is ``c K c - c . diag(K)``."""
    n, m = len(generated), len(reference)
    c = counts.double().to(generated.device)
    k_gg = polynomial_kernel(generated, generated)
    gg = ((c @ k_gg) * c).sum(1) - c @ k_gg.diagonal()
    gr = c @ cross_means(generated, reference)
    rr = _off_diagonal_sum(reference) / (m * (m - 1))
    return gg / (n * (n - 1)) + rr - 2 * gr / n
