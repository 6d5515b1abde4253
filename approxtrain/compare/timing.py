"""Whether measured step times are steady enough to support a speedup figure.

A speedup is the ratio of two step times. Every run records one per epoch (that
epoch's median training step). On an idle machine these agree to a few per cent
across epochs and seeds. On a loaded one they wander with the load, and a speedup
built on them measures the load, not the sampler: the same model showed 2.79x in
one sweep and 0.68x in another.

The spread of a set of runs is the coefficient of variation (sample std / mean) of
all their per-epoch step times -- every epoch of every seed; a run that recorded no
per-epoch times (a W&B run) counts its median step once. Above
:data:`NOISY_STEP_TIME_CV` a row's or its baseline's step time is *noisy* and the
speedup between them is marked unreliable. The check cannot see a load that stayed
constant through a whole run; re-time on an idle machine to be sure.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from approxtrain.compare.runs import Run

UNRELIABLE_MARK = "?"  # after a speedup built on noisy step times
NOISY_STEP_TIME_CV = 0.15  # 3x the few per cent idle epochs differ by; +-15 % on each side blurs 1.3x into 1.0x


def step_time_samples(runs: Iterable[Run]) -> list[float]:
    """Every per-epoch step time of ``runs``, or a run's median step where it has none."""
    samples: list[float] = []
    for run in runs:
        if run.epoch_step_times_s:
            samples.extend(run.epoch_step_times_s)
        elif run.step_time_s is not None:
            samples.append(run.step_time_s)
    return samples


def variation(samples: list[float]) -> float | None:
    """Coefficient of variation (sample std / mean); ``None`` below two samples or at mean 0."""
    if len(samples) < 2:
        return None
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / mean if mean > 0 else None


def is_noisy(cv: float | None) -> bool:
    """Whether a step-time spread is too large to support a speedup."""
    return cv is not None and cv > NOISY_STEP_TIME_CV


def noise_note(cv: float | None, baseline_cv: float | None, is_exact: bool) -> str | None:
    """One line saying which step times are too noisy (and what follows), or ``None``."""
    noisy = [f"{value:.0%} in {what}" for what, value in (("this row", cv), ("its baseline", baseline_cv))
             if is_noisy(value)]
    if not noisy:
        return None
    consequence = ("speedups against this baseline are unreliable" if is_exact
                   else f"the speedup is unreliable (marked {UNRELIABLE_MARK})")
    return (f"step time varies by {' and '.join(noisy)} across epochs and seeds "
            f"(coefficient of variation, limit {NOISY_STEP_TIME_CV:.0%}): {consequence}; "
            "re-time on an idle machine")
