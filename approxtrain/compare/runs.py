"""Finding run dirs and loading them into :class:`Run` records.

A *run dir* holds ``results.json`` and/or ``.hydra/``. Paths given to
:func:`collect_runs` may be run dirs, sweep dirs or any folder above them; they are
searched recursively. Whatever cannot be loaded becomes a :class:`Problem` -- one
line naming the path -- and never stops the other runs from loading.

The file, its keys, the statuses a run records and the metric direction are
:mod:`approxtrain.run.schema`'s. ``incomplete`` is this tool's own status, derived
and never written by a run -- a finished run with fewer epochs than
``trainer.epochs`` (when no ``trainer.max_steps`` cap explains it), or a running run
whose ``results.json`` has not changed for longer than :func:`stale_after_s`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from approxtrain.compare.matching import flatten
from approxtrain.run import schema
from approxtrain.run.config_keys import model_label
from approxtrain.run.schema import FINISHED, RESULTS_FILE, RUNNING, results_path

HYDRA_DIR = ".hydra"
SWEEP_FILE = "multirun.yaml"
SKIP_DIRS = frozenset({HYDRA_DIR, "wandb", "checkpoints", "__pycache__", ".git", "report", "reports"})
MIN_STALE_S = 3600.0
INCOMPLETE = "incomplete"  # derived here (see the module docstring); no run writes it
STATUSES = (*schema.STATUSES, INCOMPLETE)  # what a compared run can show


@dataclass
class Problem:
    """A path that could not be loaded as a run, and why (one line)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Run:
    """One training run as read from its run dir (or from W&B)."""

    path: str
    status: str
    model: str
    dataset: str
    sampler: str
    ratio: float | None
    seed: int | None
    layers: str | None
    metric_name: str
    best_metric: float | None  # what compare reports: the test metric at the best epoch (see run_from_results)
    final_metric: float | None
    compute_reduction: float | None
    step_time_s: float | None  # median training step of the run
    wall_time_s: float | None
    epochs_done: int
    epochs_planned: int | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    epoch_step_times_s: list[float] = field(default_factory=list)  # each epoch's median step
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    has_config: bool = True

    @property
    def higher_is_better(self) -> bool:
        """Accuracy-like metrics grow, perplexity-like ones shrink."""
        return schema.higher_is_better(self.metric_name)

    @property
    def is_exact(self) -> bool:
        """True for an exact-training (baseline) run."""
        return self.sampler == "exact"


def find_run_dirs(root: Path) -> Iterator[Path]:
    """Yield every run dir at or below ``root`` (a dir with ``results.json`` or ``.hydra/``)."""
    for current, dirs, files in os.walk(root):
        here = Path(current)
        if RESULTS_FILE in files or HYDRA_DIR in dirs:
            dirs[:] = []
            yield here
            continue
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)


def collect_runs(paths: Iterable[Path | str]) -> tuple[list[Run], list[Problem]]:
    """Load every run under ``paths``; returns the runs and the problems met, both sorted by path."""
    runs: list[Run] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if root.is_file() and root.name == RESULTS_FILE:
            root = root.parent
        found = False
        for run_dir in find_run_dirs(root):
            found = True
            resolved = run_dir.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            run, run_problems = load_run_dir(run_dir)
            problems.extend(run_problems)
            if run is not None:
                runs.append(run)
        if not found:
            problems.append(Problem(str(root), "no run dirs found (no results.json or .hydra/ below it)"))
    return sorted(runs, key=lambda r: r.path), sorted(problems, key=lambda p: p.path)


def load_run_dir(run_dir: Path) -> tuple[Run | None, list[Problem]]:
    """Load one run dir; ``None`` plus a problem when ``results.json`` is missing or unreadable."""
    path = results_path(run_dir)
    if not path.is_file():
        return None, [Problem(str(run_dir), f"missing {RESULTS_FILE} (not started, or died before its first epoch)")]
    results, problem = _read_json_object(path)
    if problem is not None:
        return None, [problem]
    config, config_problem = _read_config(run_dir)
    problems = [config_problem] if config_problem is not None else []
    run = run_from_results(str(run_dir), results, config, overrides=_read_overrides(run_dir))
    if config is None:
        run.notes.append("no usable .hydra/config.yaml: baseline matched on model, dataset and seed only")
    age_s = time.time() - path.stat().st_mtime
    run.status = derive_status(run, results_age_s=age_s, stale_after=stale_after_s(results))
    return run, problems


def _read_json_object(path: Path) -> tuple[dict[str, Any], Problem | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        return {}, Problem(str(path), f"unreadable: {error}")
    except json.JSONDecodeError as error:
        return {}, Problem(str(path), f"corrupt JSON: {error}")
    if not isinstance(data, dict):
        return {}, Problem(str(path), f"expected a JSON object, got {type(data).__name__}")
    return data, None


def _read_config(run_dir: Path) -> tuple[dict[str, Any] | None, Problem | None]:
    path = run_dir / HYDRA_DIR / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, Problem(str(path), f"corrupt YAML, run kept without its config: {first_line}")
    if not isinstance(config, dict):
        return None, Problem(str(path), "expected a mapping, run kept without its config")
    return flatten(_resolved(config)), None


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve the ``${...}`` interpolations Hydra leaves in ``config.yaml``; a leaf that
    cannot be resolved here (e.g. a resolver of the training app) keeps its literal text."""
    node = OmegaConf.create(config)
    try:
        resolved = OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - fall back leaf by leaf
        return _resolve_leaves(node, config, prefix="")
    return resolved if isinstance(resolved, dict) else config


def _resolve_leaves(node: Any, config: dict[str, Any], prefix: str) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            resolved[key] = _resolve_leaves(node, value, prefix=f"{dotted}.")
            continue
        try:
            selected = OmegaConf.select(node, dotted)
            resolved[key] = OmegaConf.to_container(selected, resolve=True) if OmegaConf.is_config(selected) else selected
        except Exception:  # noqa: BLE001 - keep the literal interpolation
            resolved[key] = value
    return resolved


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / HYDRA_DIR / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [str(item) for item in overrides] if isinstance(overrides, list) else []


def run_from_results(
    path: str,
    results: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    overrides: list[str] | None = None,
    history: Iterable[Mapping[str, Any]] | None = None,
) -> Run:
    """Build a :class:`Run` from a results mapping (``results.json`` or a W&B summary)
    and a flattened config; ``config=None`` derives a minimal one from the results.
    The epochs done are the results' ``epochs`` records, or the ``history`` rows
    (``epoch``/``test_metric``) when given -- a W&B summary holds no epochs."""
    flat = dict(config) if config is not None else _config_from_results(results)
    if results.get("device") and flat.get("trainer.device") in (None, "auto"):
        flat["trainer.device"] = results["device"]  # the device it really ran on
    epochs = _epoch_records(results.get("epochs") if history is None else history)
    curve = _curve(epochs)
    return Run(
        path=path,
        status=str(results.get("status") or "unknown"),
        model=str(_first(model_label(flat), results.get("model"), "?")),  # an older run's results say model.name only
        dataset=str(_first(results.get("dataset"), flat.get("dataset.name"), "?")),
        sampler=str(_first(results.get("sampler"), flat.get("sampler.name"), "?")),
        ratio=_number(_first(results.get("ratio"), flat.get("ratio"))),
        seed=_integer(_first(results.get("seed"), flat.get("seed"))),
        layers=_text(_first(results.get("layers_rule_set"), flat.get("layers.name"), flat.get("layers"))),
        metric_name=str(results.get("metric_name") or "metric"),
        best_metric=_reported_metric(results),
        final_metric=_number(results.get("final_metric")),
        compute_reduction=_number(results.get("compute_reduction")),
        step_time_s=_number(results.get("step_time_s")),
        wall_time_s=_number(results.get("wall_time_s")),
        epochs_done=len(epochs),
        epochs_planned=_integer(flat.get("trainer.epochs")),
        curve=curve,
        epoch_step_times_s=[t for t in (_number(e.get("step_time_s")) for e in epochs) if t is not None],
        config=flat,
        overrides=list(overrides or []),
        error=_text(results.get("error")),
        has_config=config is not None,
        notes=_selection_notes(results),
    )


def _reported_metric(results: Mapping[str, Any]) -> float | None:
    """The test metric at the epoch chosen on validation (``test_metric_at_best``); a run written
    before validation splits records only ``best_metric``, its best test metric."""
    reported = _number(results.get("test_metric_at_best"))
    return reported if reported is not None else _number(results.get("best_metric"))


def _selection_notes(results: Mapping[str, Any]) -> list[str]:
    if results.get("selected_on") == schema.VALIDATION or results.get("best_metric") is None:
        return []
    why = "no validation data" if results.get("selected_on") == schema.TEST else "written before validation splits"
    return [f"best epoch chosen on the test metric ({why}): its metric is optimistic"]


def _config_from_results(results: Mapping[str, Any]) -> dict[str, Any]:
    keys = {
        "model.name": "model",
        "dataset.name": "dataset",
        "sampler.name": "sampler",
        "ratio": "ratio",
        "layers.name": "layers_rule_set",
        "seed": "seed",
    }
    return {dotted: results.get(name) for dotted, name in keys.items() if results.get(name) is not None}


def derive_status(run: Run, results_age_s: float, stale_after: float = MIN_STALE_S) -> str:
    """``incomplete`` for a short finished run or a running one silent for over
    ``stale_after`` seconds; otherwise the recorded status."""
    if run.status == FINISHED and run.epochs_planned and run.epochs_done < run.epochs_planned:
        max_steps = _number(run.config.get("trainer.max_steps"))
        if not max_steps or max_steps <= 0:
            run.notes.append(f"finished after {run.epochs_done} of {run.epochs_planned} epochs")
            return INCOMPLETE
    if run.status == RUNNING and results_age_s > stale_after:
        run.notes.append(f"status running but {RESULTS_FILE} unchanged for {results_age_s / 3600:.1f} h")
        return INCOMPLETE
    return run.status


def stale_after_s(results: Mapping[str, Any]) -> float:
    """How long a running run may leave ``results.json`` untouched: 1 h, or 3x its slowest epoch."""
    times = [_number(e.get("time_s")) for e in _epoch_records(results.get("epochs"))]
    return max([MIN_STALE_S] + [3 * t for t in times if t is not None])


def _epoch_records(epochs: Any) -> list[Mapping[str, Any]]:
    if not isinstance(epochs, (list, tuple)):
        return []
    return [e for e in epochs if isinstance(e, Mapping)]


def _curve(epochs: list[Mapping[str, Any]]) -> list[tuple[int, float]]:
    curve = []
    for index, epoch in enumerate(epochs, start=1):
        value = _number(epoch.get("test_metric"))
        if value is not None:
            curve.append((_integer(epoch.get("epoch")) or index, value))
    return curve


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
