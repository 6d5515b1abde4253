"""``--filter key=value`` and ``--sort key``: parsing, validation and application.

A filter key is a run field (:data:`RUN_FIELDS`) or a dotted config key
(``trainer.epochs``, ``sampler.name``); ``key=a,b`` keeps runs matching either
value; several filters must all match. Numbers compare numerically (``0.3`` ==
``0.30``), ``true``/``false``/``null`` match booleans and missing values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from approxtrain.compare.runs import Run
from approxtrain.compare.table import SORT_KEYS

RUN_FIELDS = ("model", "dataset", "sampler", "ratio", "seed", "layers", "status", "metric_name")


class UsageError(ValueError):
    """A bad command-line value; its message is one line naming the value and what is allowed."""


@dataclass(frozen=True)
class Filter:
    """Keep runs whose ``key`` equals one of ``values``."""

    key: str
    values: tuple[str, ...]

    def matches(self, run: Run) -> bool:
        actual = getattr(run, self.key) if self.key in RUN_FIELDS else run.config.get(self.key)
        return any(_equal(actual, wanted) for wanted in self.values)


def parse_filter(text: str) -> Filter:
    """Parse ``key=value[,value...]``; raises :class:`UsageError` on anything else."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise UsageError(f"bad --filter {text!r}: expected key=value, e.g. sampler=topk or trainer.epochs=10")
    return Filter(key, tuple(v.strip() for v in value.split(",")))


def check_filter_keys(filters: Iterable[Filter], runs: Sequence[Run]) -> None:
    """Raise :class:`UsageError` for a filter key that is neither a run field nor in any run's config."""
    config_keys = {key for run in runs for key in run.config}
    for item in filters:
        if item.key not in RUN_FIELDS and item.key not in config_keys:
            raise UsageError(
                f"unknown --filter key {item.key!r}; allowed: {', '.join(RUN_FIELDS)}, "
                "or a dotted config key such as trainer.epochs"
            )


def apply_filters(runs: Iterable[Run], filters: Sequence[Filter]) -> list[Run]:
    """The runs matching every filter."""
    return [run for run in runs if all(item.matches(run) for item in filters)]


def check_sort_key(key: str | None) -> str | None:
    """Return ``key`` if it is a :data:`SORT_KEYS` name (or ``None``); else raise :class:`UsageError`."""
    if key is not None and key not in SORT_KEYS:
        raise UsageError(f"unknown --sort key {key!r}; allowed: {', '.join(SORT_KEYS)}")
    return key


def _equal(actual: Any, wanted: str) -> bool:
    lowered = wanted.lower()
    if actual is None:
        return lowered in ("null", "none", "")
    if isinstance(actual, bool):
        return lowered == str(actual).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(wanted) == float(actual)
        except ValueError:
            return False
    return str(actual) == wanted
