"""Is a row's difference to its exact baseline more than seed noise? Intervals and verdicts.

A row's values are one metric per seed (runs repeated under a seed averaged first), and so
are its baseline's. The difference is ``mean(row) - mean(baseline)``; its 95 % interval is

* **Welch's t** when both sides have at least :data:`MIN_SEEDS_FOR_T` seeds: ``d ± t(0.975, ν)
  · sqrt(s_a²/n_a + s_b²/n_b)`` with the Welch-Satterthwaite ``ν`` (unequal variances, unpaired);
* a **percentile bootstrap** when a side has 2 seeds (each side resampled with replacement,
  :data:`BOOTSTRAP_RESAMPLES` times, from a fixed seed so a report is reproducible). With two
  values a side it spans about ``[min a - max b, max a - min b]``; it is said as such, because
  it is far too narrow to trust;
* none when a side has one seed: one value has no spread to compare against.

The verdict follows the interval in the metric's direction (accuracy up is better,
perplexity down is better): ``better`` or ``worse`` when it excludes 0, else ``within noise``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
MIN_SEEDS_FOR_T = 3  # below this on either side: bootstrap (2 seeds) or no interval (1)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
WELCH, BOOTSTRAP = "welch", "bootstrap"
BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
VERDICTS = (BETTER, WORSE, WITHIN_NOISE)


@dataclass(frozen=True)
class Interval:
    """A :data:`CONFIDENCE` interval ``[low, high]`` of a difference of means, and how it was made."""

    low: float
    high: float
    method: str  # WELCH or BOOTSTRAP

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def difference_interval(values: Sequence[float], reference: Sequence[float]) -> Interval | None:
    """The interval of ``mean(values) - mean(reference)``: Welch's t, a bootstrap when a side has
    2 values, ``None`` when a side has fewer."""
    if min(len(values), len(reference)) < 2:
        return None
    if min(len(values), len(reference)) < MIN_SEEDS_FOR_T:
        return bootstrap_interval(values, reference)
    return welch_interval(values, reference)


def welch_interval(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Welch's t interval of ``mean(values) - mean(reference)`` (each side >= 2 values)."""
    from scipy.stats import t  # scipy only when an interval is asked for

    difference = statistics.fmean(values) - statistics.fmean(reference)
    share_a = statistics.variance(values) / len(values)
    share_b = statistics.variance(reference) / len(reference)
    standard_error = math.sqrt(share_a + share_b)
    if standard_error == 0:  # every seed gave the same value on both sides
        return Interval(difference, difference, WELCH)
    dof = (share_a + share_b) ** 2 / (share_a**2 / (len(values) - 1) + share_b**2 / (len(reference) - 1))
    half_width = float(t.ppf(0.5 + confidence / 2, dof)) * standard_error
    return Interval(difference - half_width, difference + half_width, WELCH)


def bootstrap_interval(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile bootstrap interval of ``mean(values) - mean(reference)``, each side resampled
    with replacement ``resamples`` times from a generator seeded by ``seed``."""
    import numpy as np

    generator = np.random.default_rng(seed)

    def resampled_means(sample: Sequence[float]) -> np.ndarray:
        data = np.asarray(sample, dtype=float)
        return data[generator.integers(len(data), size=(resamples, len(data)))].mean(axis=1)

    differences = resampled_means(values) - resampled_means(reference)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return Interval(float(low), float(high), BOOTSTRAP)


def verdict(interval: Interval | None, higher_is_better: bool) -> str | None:
    """``better``/``worse`` when ``interval`` excludes 0 (in the metric's direction), else
    ``within noise``; ``None`` without an interval."""
    if interval is None:
        return None
    if not interval.excludes_zero():
        return WITHIN_NOISE
    return BETTER if (interval.low > 0) == higher_is_better else WORSE
