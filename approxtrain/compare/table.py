"""Comparison rows: each run against its exact baseline, and seeds aggregated.

Per run, the baseline is every exact run with the same settings and seed (see
:mod:`approxtrain.compare.matching`); finished baselines are preferred over
running/incomplete ones. ``delta = best_metric - baseline best_metric`` (for
perplexity a positive delta is worse) and ``speedup = baseline step time / step time``.

Runs with one identity (:func:`~approxtrain.compare.matching.run_identity`: the whole
config but the seed and bookkeeping keys) and one status form a :class:`Row`. Its
replicates are its *seeds*: runs that share a seed too (an exact sweep over ``ratio``,
which exact ignores, or a config run twice) are one experiment, averaged into that
seed's value and noted, never counted as extra seeds. A row's mean, sample standard
deviation and n are over its seeds' values. Its ``delta`` is the mean metric minus the
mean baseline metric over the seeds that have a baseline, with a 95 % interval and a
verdict (``better | worse | within noise``, :mod:`approxtrain.compare.stats`); its speedup the
mean baseline step time over those seeds divided by the mean step time, marked unreliable
when either step time is noisy (:mod:`approxtrain.compare.timing`). A row with fewer than
``min_seeds`` seeds (default 3) is named in its table's ``warnings``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from approxtrain.compare.matching import (
    differing_keys,
    format_overrides,
    run_identity,
    setting_key,
    varying_keys,
)
from approxtrain.compare.runs import Run
from approxtrain.compare.stats import MIN_SEEDS_FOR_T, Interval, difference_interval, verdict
from approxtrain.compare.timing import is_noisy, noise_note, step_time_samples, variation
from approxtrain.run.schema import FINISHED

BaselineIndex = dict[tuple[Any, ...], list[Run]]
DEFAULT_MIN_SEEDS = MIN_SEEDS_FOR_T  # fewer seeds in a row: a warning (``--min-seeds``)
RUN_RECORD_FIELDS = (
    "path", "status", "model", "dataset", "metric_name", "higher_is_better", "sampler", "ratio", "layers",
    "seed", "n", "compute_reduction", "best_metric", "final_metric", "baseline_metric", "delta",
    "step_time_s", "baseline_step_time_s", "speedup", "step_time_cv", "baseline_step_time_cv", "speedup_reliable",
    "epochs_done", "epochs_planned", "wall_time_s",
    "overrides", "hydra_overrides", "baseline_paths", "error", "notes",
)  # the keys of RunRow.as_record(), in CSV column order


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (``None`` below two values) and count."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        """Summarise the non-``None`` values."""
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))


def seed_stat(groups: Iterable[Iterable[float | None]]) -> Stat:
    """:class:`Stat` over seeds of each seed's mean (``groups``: one list of values per
    seed), so that runs repeated with one seed count once."""
    return Stat.of(Stat.of(values).mean for values in groups)


@dataclass
class Baseline:
    """The exact runs a run or row is compared with."""

    metric: float | None = None
    metric_std: float | None = None  # over the baseline's seeds
    values: list[float] = field(default_factory=list)  # its metric per seed (repeats averaged)
    step_time_s: float | None = None
    paths: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    partial: bool = False
    step_time_cv: float | None = None  # spread of its per-epoch step times (see timing)


@dataclass
class RunRow:
    """One run compared with its own baseline."""

    run: Run
    baseline: Baseline
    overrides: str = ""

    @property
    def delta(self) -> float | None:
        return _difference(self.run.best_metric, self.baseline.metric)

    @property
    def speedup(self) -> float | None:
        return _ratio(self.baseline.step_time_s, self.run.step_time_s)

    @property
    def step_time_cv(self) -> float | None:
        return variation(step_time_samples([self.run]))

    @property
    def speedup_reliable(self) -> bool | None:
        baseline_cv = None if self.run.is_exact else self.baseline.step_time_cv
        return _speedup_reliable(self.speedup, self.step_time_cv, baseline_cv)

    def as_record(self) -> dict[str, Any]:
        """Flat, JSON/CSV-ready fields."""
        run = self.run
        return {
            "path": run.path,
            "status": run.status,
            "model": run.model,
            "dataset": run.dataset,
            "metric_name": run.metric_name,
            "higher_is_better": run.higher_is_better,
            "sampler": run.sampler,
            "ratio": None if run.is_exact else run.ratio,
            "layers": None if run.is_exact else run.layers,
            "seed": run.seed,
            "n": 1,
            "compute_reduction": run.compute_reduction,
            "best_metric": run.best_metric,
            "final_metric": run.final_metric,
            "baseline_metric": self.baseline.metric,
            "delta": self.delta,
            "step_time_s": run.step_time_s,
            "baseline_step_time_s": self.baseline.step_time_s,
            "speedup": self.speedup,
            "step_time_cv": self.step_time_cv,
            "baseline_step_time_cv": self.baseline.step_time_cv,
            "speedup_reliable": self.speedup_reliable,
            "epochs_done": run.epochs_done,
            "epochs_planned": run.epochs_planned,
            "wall_time_s": run.wall_time_s,
            "overrides": self.overrides,
            "hydra_overrides": " ".join(run.overrides),
            "baseline_paths": " ".join(self.baseline.paths),
            "error": run.error,
            "notes": "; ".join(run.notes + _baseline_notes(self.baseline, run.is_exact)
                               + _noise_notes(self.step_time_cv, self.baseline.step_time_cv, run.is_exact)),
        }


@dataclass
class Row:
    """Runs that differ only in seed, aggregated over seeds and compared with their baselines."""

    rows: list[RunRow]
    baseline: Baseline
    overrides: str = ""

    @property
    def first(self) -> Run:
        return self.rows[0].run

    @property
    def runs(self) -> list[Run]:
        return [row.run for row in self.rows]

    @property
    def is_exact(self) -> bool:
        return self.first.is_exact

    @property
    def by_seed(self) -> dict[int | None, list[Run]]:
        """The row's runs per seed (seeds in order); more than one run under a seed is a repeat."""
        groups = _partition(self.runs, lambda run: run.seed)
        return {seed: groups[seed] for seed in sorted(groups, key=_none_last)}

    @property
    def n(self) -> int:
        """Replicates: the number of seeds."""
        return len(self.by_seed)

    def _over_seeds(self, name: str) -> Stat:
        return seed_stat([[getattr(run, name) for run in runs] for runs in self.by_seed.values()])

    @property
    def best_metric(self) -> Stat:
        return self._over_seeds("best_metric")

    @property
    def compute_reduction(self) -> Stat:
        return self._over_seeds("compute_reduction")

    @property
    def step_time_s(self) -> Stat:
        return self._over_seeds("step_time_s")

    @property
    def step_time_cv(self) -> float | None:
        return variation(step_time_samples(self.runs))

    @property
    def speedup_reliable(self) -> bool | None:
        """``False`` when the row's or its baseline's step times are too noisy for its speedup."""
        baseline_cv = None if self.is_exact else self.baseline.step_time_cv
        return _speedup_reliable(self.speedup, self.step_time_cv, baseline_cv)

    @property
    def delta(self) -> float | None:
        return _difference(self.best_metric.mean, self.baseline.metric)

    @property
    def metric_values(self) -> list[float]:
        """The row's metric per seed (runs repeated under one seed averaged), seeds without one left out."""
        means = (Stat.of(run.best_metric for run in runs).mean for runs in self.by_seed.values())
        return [value for value in means if value is not None]

    @cached_property
    def interval(self) -> Interval | None:
        """95 % interval of ``delta`` (:func:`~approxtrain.compare.stats.difference_interval`); None for exact rows."""
        return None if self.is_exact else difference_interval(self.metric_values, self.baseline.values)

    @property
    def verdict(self) -> str | None:
        """``better | worse | within noise`` against the baseline, in the metric's direction; None without an interval."""
        return verdict(self.interval, self.first.higher_is_better)

    @property
    def speedup(self) -> float | None:
        return _ratio(self.baseline.step_time_s, self.step_time_s.mean)

    @property
    def seeds(self) -> list[int | None]:
        return list(self.by_seed)

    @property
    def epochs(self) -> str:
        """``10/10``, or ``3-10/10`` when the seeds differ; ``/?`` when the plan is unknown."""
        done = sorted(run.epochs_done for run in self.runs)
        span = str(done[0]) if done[0] == done[-1] else f"{done[0]}-{done[-1]}"
        planned = self.first.epochs_planned
        return f"{span}/{planned if planned is not None else '?'}"

    @property
    def notes(self) -> list[str]:
        notes = [f"seed {run.seed}: {note}" for run in self.runs for note in run.notes]
        notes += [f"seed {run.seed}: {run.error}" for run in self.runs if run.error]
        notes += [_repeat_note(seed, runs) for seed, runs in self.by_seed.items() if len(runs) > 1]
        notes += _baseline_notes(self.baseline, self.is_exact, len(self.seeds))
        return notes + _noise_notes(self.step_time_cv, self.baseline.step_time_cv, self.is_exact)

    def as_record(self) -> dict[str, Any]:
        """Flat, JSON/CSV-ready fields (``*_std`` are sample standard deviations)."""
        first, metric, reduction, step = self.first, self.best_metric, self.compute_reduction, self.step_time_s
        return {
            "model": first.model,
            "dataset": first.dataset,
            "metric_name": first.metric_name,
            "higher_is_better": first.higher_is_better,
            "sampler": first.sampler,
            "ratio": None if self.is_exact else first.ratio,
            "layers": None if self.is_exact else first.layers,
            "status": first.status,
            "n": self.n,
            "runs": len(self.rows),
            "seeds": self.seeds,
            "compute_reduction": reduction.mean,
            "compute_reduction_std": reduction.std,
            "best_metric": metric.mean,
            "best_metric_std": metric.std,
            "best_metric_n": metric.n,
            "baseline_metric": self.baseline.metric,
            "baseline_metric_std": self.baseline.metric_std,
            "baseline_seeds": self.baseline.seeds,
            "delta": self.delta,
            "delta_low": None if self.interval is None else self.interval.low,
            "delta_high": None if self.interval is None else self.interval.high,
            "interval_method": None if self.interval is None else self.interval.method,
            "verdict": self.verdict,
            "step_time_s": step.mean,
            "step_time_s_std": step.std,
            "baseline_step_time_s": self.baseline.step_time_s,
            "speedup": self.speedup,
            "step_time_cv": self.step_time_cv,
            "baseline_step_time_cv": self.baseline.step_time_cv,
            "speedup_reliable": self.speedup_reliable,
            "epochs_done": min(run.epochs_done for run in self.runs),
            "epochs": self.epochs,
            "overrides": self.overrides,
            "notes": self.notes,
            "paths": [run.path for run in self.runs],
        }


@dataclass
class Table:
    """All rows of one model on one dataset with one metric."""

    model: str
    dataset: str
    metric_name: str
    higher_is_better: bool
    rows: list[Row]
    run_rows: list[RunRow]
    min_seeds: int = DEFAULT_MIN_SEEDS

    @property
    def warnings(self) -> list[str]:
        """One line per row with fewer than ``min_seeds`` seeds: a difference it shows may be noise."""
        return [_few_seeds_warning(row, self.min_seeds) for row in self.rows if row.n < self.min_seeds]

    @property
    def title(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better"
        return f"{self.model} / {self.dataset}: {self.metric_name} ({direction})"

    def as_record(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "rows": [row.as_record() for row in self.rows],
            "warnings": self.warnings,
        }


SORT_KEYS: dict[str, str] = {
    "sampler": "sampler",
    "ratio": "ratio",
    "layers": "layers",
    "compute_reduction": "compute_reduction",
    "best_metric": "best_metric",
    "delta": "delta",
    "verdict": "verdict",
    "step_time": "step_time_s",
    "speedup": "speedup",
    "epochs": "epochs_done",
    "status": "status",
    "seed": "seed",
    "n": "n",
}


def build_rows(runs: Sequence[Run], selected: Sequence[Run] | None = None,
               min_seeds: int = DEFAULT_MIN_SEEDS) -> list[Table]:
    """Compare ``selected`` runs (default: all) with baselines found among all ``runs``;
    one :class:`Table` per model, dataset and metric, rows in the default order; rows with
    fewer than ``min_seeds`` seeds are named in the table's warnings."""
    baselines = index_baselines(runs)
    chosen = list(runs if selected is None else selected)
    tables = []
    for (model, dataset, metric_name), members in _partition(chosen, _table_key).items():
        keys = varying_keys([run.config for run in members])
        run_rows = [
            RunRow(run, baseline_for(run, [run.seed], baselines), format_overrides(run.config, keys))
            for run in members
        ]
        rows = [_aggregate(group, baselines, keys) for group in _partition(run_rows, _group_key).values()]
        tables.append(
            Table(model, dataset, metric_name, members[0].higher_is_better, sort_rows(rows), sort_rows(run_rows),
                  min_seeds)
        )
    return sorted(tables, key=lambda t: (t.model, t.dataset, t.metric_name))


def index_baselines(runs: Iterable[Run]) -> BaselineIndex:
    """Exact runs with a metric, by settings and seed, and (for runs without a config)
    by model, dataset, metric and seed."""
    index: BaselineIndex = {}
    for run in runs:
        if run.is_exact and run.best_metric is not None:
            for key in _baseline_keys(run, run.seed):
                index.setdefault(key, []).append(run)
    return index


def _baseline_keys(run: Run, seed: int | None) -> list[tuple[Any, ...]]:
    loose = ("loose", run.model, run.dataset, run.metric_name, seed)
    return [("settings", setting_key(run.config), seed), loose] if run.has_config else [loose]


def baseline_for(run: Run, seeds: Iterable[int | None], index: BaselineIndex) -> Baseline:
    """Average the exact baselines of ``run``'s settings over ``seeds`` (per seed first);
    finished baselines are used when a seed has any. A run without a config matches
    exact runs of the same model, dataset, metric and seed."""
    per_seed: list[tuple[int | None, list[Run]]] = []
    partial = False
    for seed in seeds:
        candidates = index.get(_baseline_keys(run, seed)[0], [])
        finished = [b for b in candidates if b.status == FINISHED]
        partial = partial or (bool(candidates) and not finished)
        if candidates:
            per_seed.append((seed, finished or candidates))
    if not per_seed:
        return Baseline()
    values = [Stat.of(b.best_metric for b in group).mean for _, group in per_seed]
    metric = Stat.of(values)
    baselines = [b for _, group in per_seed for b in group]
    return Baseline(
        metric=metric.mean,
        metric_std=metric.std,
        values=[value for value in values if value is not None],
        step_time_s=seed_stat([[b.step_time_s for b in group] for _, group in per_seed]).mean,
        paths=[b.path for b in baselines],
        seeds=[seed for seed, _ in per_seed],
        partial=partial,
        step_time_cv=variation(step_time_samples(baselines)),
    )


def sort_rows(rows: list[Any], key: str | None = None, reverse: bool = False) -> list[Any]:
    """Sort :class:`Row`/:class:`RunRow` objects by a :data:`SORT_KEYS` name (missing values last);
    the default order is exact first, then sampler, ratio, layers, status, seed."""
    if key is None:
        return sorted(rows, key=_default_order)
    field_name = SORT_KEYS[key]
    present = [row for row in rows if row.as_record().get(field_name) is not None]
    missing = [row for row in rows if row.as_record().get(field_name) is None]
    return sorted(present, key=lambda row: row.as_record()[field_name], reverse=reverse) + missing


def sort_tables(tables: list[Table], key: str | None = None, reverse: bool = False) -> list[Table]:
    """Sort the rows (and run rows) of every table in place by a :data:`SORT_KEYS` name."""
    for table in tables:
        table.rows = sort_rows(table.rows, key, reverse)
        table.run_rows = sort_rows(table.run_rows, key, reverse)
    return tables


def _aggregate(group: list[RunRow], index: BaselineIndex, keys: list[str]) -> Row:
    first = group[0].run
    seeds = sorted({row.run.seed for row in group}, key=_none_last)
    return Row(group, baseline_for(first, seeds, index), format_overrides(first.config, keys))


def _partition(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _table_key(run: Run) -> tuple[str, str, str]:
    return run.model, run.dataset, run.metric_name


def _group_key(row: RunRow) -> tuple[Any, ...]:
    return run_identity(row.run.config), row.run.status


def _default_order(row: Any) -> tuple[Any, ...]:
    record = row.as_record()
    return (
        record["sampler"] != "exact",
        str(record["sampler"]),
        record["ratio"] if record["ratio"] is not None else 1.0,
        str(record["layers"]),
        record["status"],
        str(record.get("overrides")),
        _none_last(record.get("seed")),
    )


def _baseline_notes(baseline: Baseline, is_exact: bool, n_seeds: int = 1) -> list[str]:
    if is_exact:
        return []
    if not baseline.seeds:
        return ["no exact baseline with the same settings and seed"]
    notes = []
    if len(baseline.seeds) < n_seeds:
        notes.append(f"baseline for {len(baseline.seeds)} of {n_seeds} seeds")
    if baseline.partial:
        notes.append("baseline not finished")
    return notes


def _few_seeds_warning(row: Row, min_seeds: int) -> str:
    if row.n < 2:
        consequence = "no interval or verdict"
    elif row.n < MIN_SEEDS_FOR_T:
        consequence = "its interval is a bootstrap over 2 seeds, too narrow to trust"
    else:
        consequence = "its interval is wide"
    label = row.overrides or row.first.sampler
    return f"{label} [{row.first.status}]: {row.n} seed{'s' if row.n != 1 else ''}, fewer than {min_seeds}: {consequence}"


def _repeat_note(seed: int | None, runs: list[Run]) -> str:
    """Why runs sharing a seed count as one replicate, naming the keys they differ in."""
    keys = differing_keys(run.config for run in runs)
    values = [f"{key} {', '.join(sorted({str(run.config.get(key)) for run in runs}))}" for key in keys]
    ignored = f" that differ only in {'; '.join(values)}, which {runs[0].sampler} ignores," if values else ""
    return f"seed {seed}: {len(runs)} runs{ignored} are one experiment, averaged as one seed"


def _noise_notes(cv: float | None, baseline_cv: float | None, is_exact: bool) -> list[str]:
    note = noise_note(cv, None if is_exact else baseline_cv, is_exact)
    return [note] if note else []


def _speedup_reliable(speedup: float | None, cv: float | None, baseline_cv: float | None) -> bool | None:
    return None if speedup is None else not (is_noisy(cv) or is_noisy(baseline_cv))


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _none_last(value: Any) -> tuple[bool, Any]:
    return (value is None, value if value is not None else 0)
