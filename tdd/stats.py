"""Statistics for studies: mean and spread over training seeds, bootstrap intervals, and
paired comparisons of two arms (same prompts and per-image seeds, seed-matched runs).

Every interval has nominal coverage ``level`` (95 % by default). A comparison ``differs``
when its interval for the difference excludes 0. Values that are missing (a crashed run, a
metric not computed) are counted and reported, never filled in.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

LEVEL = 0.95


def is_number(value) -> bool:
    """A finite real number (not a bool, not a "not computed: ..." string)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of the values present; ``missing`` says which
    runs had none and why."""

    mean: float
    std: float
    n: int
    missing: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.n + len(self.missing)


def summarize(values: Mapping[str, object]) -> Summary:
    """``values``: run name -> value. Non-numbers (None, a reason string, NaN) are missing."""
    present = [float(v) for v in values.values() if is_number(v)]
    missing = tuple(f"{name}: {_reason(v)}" for name, v in values.items() if not is_number(v))
    mean = float(np.mean(present)) if present else math.nan
    std = float(np.std(present, ddof=1)) if len(present) > 1 else math.nan
    return Summary(mean, std, len(present), missing)


def _reason(value) -> str:
    if value is None:
        return "no value (crashed, not run, or metric not recorded)"
    return value if isinstance(value, str) else f"not a finite number ({value!r})"


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t distribution: the density integrated from 0 with Simpson's rule."""
    if x < 0:
        return 1 - t_cdf(-x, df)
    log_norm = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                - 0.5 * math.log(df * math.pi))
    grid = np.linspace(0.0, x, 4001)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return min(1.0, 0.5 + float((weights * density).sum() * (grid[1] - grid[0]) / 3))


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution, by bisection on :func:`t_cdf`."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the mean of independent values (training seeds)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return (math.nan, math.nan)
    if x.std() == 0:
        return (float(x[0]), float(x[0]))
    half = t_quantile(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return (float(x.mean() - half), float(x.mean() + half))


def bootstrap_interval(
    values: Sequence[float], draws: int = 2000, level: float = LEVEL,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (images, or seeds)."""
    x = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if len(x) < 2:
        return (math.nan, math.nan)
    means = x[torch.randint(len(x), (draws, len(x)), generator=generator)].mean(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return (float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    """Arm B minus arm A: the mean difference, its interval, a p-value and how it was made."""

    difference: float
    interval: tuple[float, float]
    p_value: float
    n: int
    method: str

    @property
    def differs(self) -> bool:
        """True when the interval for the difference excludes 0."""
        low, high = self.interval
        return bool(low > 0 or high < 0)


def paired_images(
    a: Sequence[float], b: Sequence[float], draws: int = 2000, level: float = LEVEL,
    generator: torch.Generator | None = None,
) -> Comparison:
    """Per-image scores of two arms on the same prompts and per-image seeds: the paired
    bootstrap interval of the mean difference ``b - a`` and a sign-flip test (the p-value of
    the observed mean difference among ``draws`` random sign flips of the differences)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_images: {a.shape} vs {b.shape} images: not the same set")
    d = torch.as_tensor(b - a)
    signs = torch.randint(2, (draws, len(d)), generator=generator).double() * 2 - 1
    flipped = (signs * d).mean(1).abs()
    p_value = float(((flipped >= d.mean().abs() - 1e-12).sum() + 1) / (draws + 1))
    return Comparison(float(d.mean()), bootstrap_interval(d.numpy(), draws, level, generator),
                      p_value, len(d), "paired images: bootstrap + sign flips")


def compare_seeds(
    a: Mapping[object, float], b: Mapping[object, float], level: float = LEVEL
) -> Comparison:
    """Two arms' values per training seed. Seeds both arms have: paired t on the per-seed
    differences; otherwise Welch's t on the two groups. Needs >= 2 values per arm."""
    common = sorted(set(a) & set(b), key=str)
    if len(common) >= 2 and len(common) == len(a) == len(b):
        d = np.array([b[s] - a[s] for s in common], dtype=np.float64)
        p_value = _t_p_value(d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1)
        return Comparison(float(d.mean()), mean_interval(d, level), p_value, len(d),
                          "paired seeds: t")
    x, y = (np.array(list(v.values()), dtype=np.float64) for v in (a, b))
    if min(len(x), len(y)) < 2:
        return Comparison(float(y.mean() - x.mean()) if len(x) and len(y) else math.nan,
                          (math.nan, math.nan), math.nan, min(len(x), len(y)),
                          "fewer than 2 seeds: no test")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    difference, scale = float(y.mean() - x.mean()), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if scale else 1.0
    half = t_quantile(0.5 + level / 2, df) * scale
    return Comparison(difference, (difference - half, difference + half),
                      _t_p_value(difference, scale, df), min(len(x), len(y)), "Welch t")


def _t_p_value(difference: float, scale: float, df: float) -> float:
    """Two-sided p-value of ``difference / scale`` under Student's t (no spread at all: 0
    for a nonzero difference, 1 for none)."""
    if scale == 0:
        return 0.0 if difference else 1.0
    return 2 * (1 - t_cdf(abs(difference / scale), df))


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two ``[low, high]`` intervals share a point."""
    return a[0] <= b[1] and b[0] <= a[1]
