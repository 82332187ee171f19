"""Intervals over seeds and rounds, and how the reports print them.

A figure over seeds is their mean with a 95% t-interval (t with n - 1 degrees of freedom), every
seed's value kept; a ratio over timing rounds is their median with a distribution-free interval
from order statistics. Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from scipy import stats

CONFIDENCE = 0.95  # of every interval the reports give
SEED_INTERVAL = "t-interval"  # over seeds: mean +- t(n - 1) * sd / sqrt(n)
INTERVAL_NOTE = (
  "mean [95% CI lo, hi], n seeds, t-interval (t with n - 1 degrees of freedom; one seed: no "
  "interval)"
)


def seed_interval(per_seed: Mapping[Any, float]) -> dict[str, Any]:
  """Mean over seeds and its 95% t-interval (n - 1 degrees of freedom), every seed's value kept.

  Non-finite values (a seed whose sweep does not reach the target) are left out of the mean and
  counted out of `n`. One value: no interval (`ci` is NaN, NaN).

  Returns:
    `{"mean", "ci": [lo, hi], "n", "per_seed": {seed: value}}`.
  """
  finite = [v for v in per_seed.values() if math.isfinite(v)]
  n = len(finite)
  mean = statistics.fmean(finite) if finite else float("nan")
  lo = hi = float("nan")
  if n > 1:
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * statistics.stdev(finite) / math.sqrt(n)
    lo, hi = mean - half, mean + half
  return {
    "mean": mean,
    "ci": [float(lo), float(hi)],
    "n": n,
    "per_seed": {str(s): float(v) for s, v in per_seed.items()},
  }


def median_interval(values: Sequence[float]) -> dict[str, Any]:
  """The median of `values` and a distribution-free interval for it from order statistics.

  The interval is `[x_(k), x_(n+1-k)]` of the sorted values with the largest k whose coverage
  `1 - 2 P(B < k)`, B ~ Binomial(n, 1/2), is at least 95%. Below 6 values no k reaches 95%:
  the interval is then the smallest and largest value, and `coverage` says what it covers.

  Returns:
    `{"median", "ci": [lo, hi], "coverage", "n"}`.
  """
  x = sorted(float(v) for v in values)
  n = len(x)
  if not n:
    return {"median": float("nan"), "ci": [float("nan")] * 2, "coverage": 0.0, "n": 0}
  k = 1
  while k < n + 1 - k and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= CONFIDENCE:
    k += 1  # x_(k+1) .. x_(n-k) still covers 95%
  coverage = 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)
  return {"median": statistics.median(x), "ci": [x[k - 1], x[n - k]], "coverage": coverage, "n": n}


def formatted(
  x: float | None, fmt: str, ci: Sequence[float] | None = None, n: int | None = None
) -> str:
  """`x` formatted, "not reached" where it could not be measured; with `n`, the interval `ci`
  (where there is one) and the number of seeds: "0.5073 [0.4816, 0.5330], n=2"."""
  if x is None or not math.isfinite(x):
    return "not reached"
  text = format(x, fmt)
  if ci is not None and all(math.isfinite(c) for c in ci):
    text += f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"
  if n is not None:
    text += f", n={n}"
  return text


__all__ = [
  "CONFIDENCE",
  "INTERVAL_NOTE",
  "SEED_INTERVAL",
  "formatted",
  "median_interval",
  "seed_interval",
]
