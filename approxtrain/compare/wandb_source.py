"""Runs from the W&B API instead of run dirs (``approxtrain-compare --wandb ENTITY/PROJECT``).

Expected logging contract (what approxtrain's W&B logger writes):

* ``group``: the sweep (one group per multirun);
* ``config``: the resolved Hydra config, nested as composed (``model.name``,
  ``sampler.name``, ``ratio``, ``trainer.epochs``, ...), flattened here to dotted keys
  (runs logged before it was nested hold dotted keys already, which pass through);
* ``summary``: the scalars of ``results.json``, :data:`approxtrain.run.schema.SUMMARY_KEYS`
  (``status``, ``metric_name``, ``best_metric``, ``compute_reduction``, ``step_time_s``,
  ...; a ``section/`` prefix is tolerated);
* history: one row per epoch with ``epoch`` and the test metric named by what it is,
  :func:`approxtrain.run.schema.test_metric_key` (``test/accuracy``, ``test/perplexity``;
  ``test_metric`` in runs logged before) -- epochs done = rows.

``wandb`` is imported only here, and only when called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from approxtrain.compare.matching import flatten
from approxtrain.compare.runs import Problem, Run, derive_status, run_from_results
from approxtrain.compare.selection import UsageError
from approxtrain.run.schema import FAILED, FINISHED, RUNNING, STATUSES, SUMMARY_KEYS, test_metric_key

# W&B run states: those of a run that died, and those that name one of our statuses.
FAILED_STATES = frozenset({"crashed", "failed", "killed"})
STATUS_OF_STATE = {"finished": FINISHED, "running": RUNNING}
HISTORY_SAMPLES = 10_000
LEGACY_TEST_METRIC = "test_metric"  # the history's test metric in runs logged before it was named by what it is
API_TIMEOUT_S = 20


class WandbSourceError(RuntimeError):
    """W&B could not be read (not installed, offline, no credentials); one-line message."""


def fetch_wandb_runs(project: str, group: str | None = None) -> tuple[list[Run], list[Problem]]:
    """Load the runs of ``ENTITY/PROJECT`` (optionally one ``group``) through ``wandb.Api``.

    Raises :class:`UsageError` for a malformed project path and :class:`WandbSourceError`
    when the API cannot be reached; a run that cannot be converted becomes a problem.
    """
    _check_project(project)
    try:
        import wandb
    except ImportError as error:
        raise WandbSourceError(f"--wandb needs the wandb package ({error}); pip install wandb") from error
    try:
        api = wandb.Api(timeout=API_TIMEOUT_S)
        api_runs = list(api.runs(project, filters={"group": group} if group else None))
    except Exception as error:
        raise WandbSourceError(
            f"cannot read W&B project {project!r} (offline or not logged in?): {_one_line(error)}; "
            "compare local run dirs instead: approxtrain-compare outputs/"
        ) from error
    return convert_runs(api_runs, project, group)


def convert_runs(api_runs: Iterable[Any], project: str, group: str | None = None) -> tuple[list[Run], list[Problem]]:
    """Turn W&B API run objects into :class:`Run` records; failures become problems."""
    runs, problems = [], []
    for api_run in api_runs:
        if group is not None and getattr(api_run, "group", None) != group:
            continue
        path = f"wandb:{project}/{getattr(api_run, 'name', None) or getattr(api_run, 'id', '?')}"
        try:
            runs.append(convert_run(api_run, path))
        except Exception as error:  # noqa: BLE001 - one bad run must not hide the others
            problems.append(Problem(path, f"cannot read W&B run: {_one_line(error)}"))
    return sorted(runs, key=lambda r: r.path), problems


def convert_run(api_run: Any, path: str) -> Run:
    """One W&B run (``.config``, ``.summary``, ``.state``, ``.history()``) as a :class:`Run`."""
    config = {k: v for k, v in flatten(_as_dict(api_run.config)).items() if not k.startswith("_")}
    summary = _summary_values(_as_dict(api_run.summary))
    state = str(getattr(api_run, "state", "") or "")
    summary["status"] = _status(summary.get("status"), state)
    if state in FAILED_STATES and not summary.get("error"):
        summary["error"] = f"W&B state {state}"
    run = run_from_results(path, summary, config or None, history=_history(api_run, summary.get("metric_name")))
    run.status = derive_status(run, results_age_s=0.0)
    return run


def _check_project(project: str) -> None:
    parts = project.split("/")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"bad --wandb {project!r}: expected ENTITY/PROJECT, e.g. my-team/approxtrain")


def _status(recorded: Any, state: str) -> str:
    if state in FAILED_STATES:
        return FAILED
    if recorded in STATUSES:
        return str(recorded)
    return STATUS_OF_STATE.get(state, state or "unknown")


def _summary_values(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYS` present in ``summary``, bare or behind a prefix."""
    values = {name: _lookup(summary, name) for name in SUMMARY_KEYS}
    return {name: value for name, value in values.items() if value is not None}


def _lookup(mapping: Mapping[str, Any], name: str) -> Any:
    """``mapping[name]``, else the value of the first key ending in ``/name`` or ``.name``."""
    if name in mapping:
        return mapping[name]
    prefixed = sorted(k for k in mapping if k.endswith(f"/{name}") or k.endswith(f".{name}"))
    return mapping[prefixed[0]] if prefixed else None


def _history(api_run: Any, metric_name: str | None) -> list[Mapping[str, Any]]:
    """Per-epoch rows (``epoch`` and the test metric) as ``results.json`` epoch records hold them."""
    for key in ([test_metric_key(metric_name)] if metric_name else []) + [LEGACY_TEST_METRIC]:
        rows = _history_rows(api_run, key)
        if rows:
            return [{"epoch": _lookup(row, "epoch"), "test_metric": _lookup(row, key)} for row in rows]
    return []


def _history_rows(api_run: Any, key: str) -> list[dict[str, Any]]:
    """The history rows that carry ``key`` (``epoch`` and ``key`` asked for; bare or prefixed)."""
    try:
        history = api_run.history(samples=HISTORY_SAMPLES, keys=["epoch", key], pandas=False)
    except TypeError:
        history = api_run.history()
    if hasattr(history, "to_dict"):
        history = history.to_dict("records")
    rows = [_as_dict(row) for row in history or []]
    return [row for row in rows if _lookup(row, key) is not None]


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "items"):
        return dict(value.items())
    return dict(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].rstrip('.')}" if text else type(error).__name__
