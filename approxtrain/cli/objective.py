"""What the app returns to a sweeper (``objective``): the numbers an Optuna search optimises.

``objective: best_metric`` (the default) returns one number -- the best *validation* metric
(where the run has validation data), so a search chooses on validation and the test metric
(``test_metric_at_best``) stays for reporting; ``objective: [best_metric,
compute_reduction]`` a list, one per ``hydra.sweeper.direction`` (a multi-objective search,
its Pareto front in ``optimization_results.yaml``). Each name is a number of ``results.json``,
or ``ratio_within_margin``: the run's ratio when its best metric stays within ``search.margin``
of ``search.baseline`` (exact training's), else 1 plus how far it misses -- so minimising it finds
the smallest ratio that keeps the metric (``search=smallest_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from approxtrain.run.config_keys import lookup
from approxtrain.run.schema import FINISHED, Results, higher_is_better, read_results

# The numbers of results.json an objective can name.
RESULT_OBJECTIVES = ("best_metric", "final_metric", "compute_reduction", "planned_compute_reduction",
                     "step_time_s", "wall_time_s", "peak_memory_bytes")
RATIO_WITHIN_MARGIN = "ratio_within_margin"
OBJECTIVES = (*RESULT_OBJECTIVES, RATIO_WITHIN_MARGIN)


def objective_names(cfg: Mapping[str, Any]) -> list[str]:
    """The objective's names, checked: ``ValueError`` (one line naming the bad value and the allowed ones)."""
    objective = cfg.get("objective", "best_metric")
    names = [objective] if isinstance(objective, str) else objective
    if not isinstance(names, (list, tuple)) or not names or any(name not in OBJECTIVES for name in names):
        raise ValueError(f"objective={objective!r} is invalid; allowed: one of {', '.join(OBJECTIVES)}, or a list of them")
    if RATIO_WITHIN_MARGIN in names:
        baseline_metric(cfg)
        margin = lookup(cfg, "search.margin")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"search.margin={margin!r} is invalid; allowed: a number >= 0 (how much of the metric may be lost)")
    return list(names)


def baseline_metric(cfg: Mapping[str, Any]) -> float:
    """``search.baseline``: exact training's best metric, given as a number or as the dir of a finished run."""
    baseline = lookup(cfg, "search.baseline")
    allowed = "allowed: exact training's best metric (a number) or the dir of a finished exact run (search=smallest_ratio sets the key)"
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) and math.isfinite(baseline):
        return float(baseline)
    if not isinstance(baseline, str) or baseline in ("", "???"):
        raise ValueError(f"search.baseline={baseline!r} is invalid; {allowed}")
    results = read_results(Path(baseline))
    if results is None or results.get("status") != FINISHED or results.get("best_metric") is None:
        found = "no results.json" if results is None else f"status {results.get('status')}, best_metric {results.get('best_metric')}"
        raise ValueError(f"search.baseline={baseline!r} holds no finished run with a best metric ({found}); {allowed}")
    return float(results["best_metric"])


def ratio_within_margin(cfg: Mapping[str, Any], results: Results) -> float:
    """The ratio when ``results``' best metric is within ``search.margin`` of the baseline's, else
    1 + the miss beyond the margin (every such run ranks behind every run that keeps the metric)."""
    best = results.best_metric
    if best is None:
        return math.inf
    shortfall = baseline_metric(cfg) - best if higher_is_better(results.metric_name) else best - baseline_metric(cfg)
    margin = lookup(cfg, "search.margin")
    kept = shortfall <= margin or math.isclose(shortfall, margin, rel_tol=1e-9)  # 0.96 - 0.94 is 0.020000000000000018
    return float(cfg["ratio"]) if kept else 1.0 + shortfall - margin


def objective_value(cfg: Mapping[str, Any], results: Results) -> float | list[float]:
    """The value(s) the app returns for a finished run: one number, or a list when ``objective`` is
    a list. A missing number (no finite metric) is NaN, which Optuna records as a failed trial."""
    values = []
    for name in objective_names(cfg):
        value = ratio_within_margin(cfg, results) if name == RATIO_WITHIN_MARGIN else getattr(results, name)
        values.append(math.nan if value is None else float(value))
    return values if isinstance(cfg.get("objective"), (list, tuple)) else values[0]
