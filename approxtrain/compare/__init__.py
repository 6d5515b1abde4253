"""Offline comparison of approxtrain runs against their exact baselines.

``collect_runs(paths)`` loads run dirs (recursively) into runs and problems,
``build_rows(runs)`` compares them with their exact baselines and aggregates seeds
into one table per model/dataset (95 % intervals and verdicts of the differences,
:mod:`~approxtrain.compare.stats`; flagging speedups from noisy step times),
``print_tables``/``print_sweep_table`` render them with rich, and ``write_report``
writes ``report.md``, ``runs.csv`` and the figures ``pareto``/``curves`` (PNG, plus
PDF/SVG on request; fixed colours per sampler). ``fetch_wandb_runs`` reads the same
runs from the W&B API.
"""

from approxtrain.compare.console import print_sweep_table, print_tables
from approxtrain.compare.report import to_csv, to_json, to_markdown, write_report
from approxtrain.compare.runs import Problem, Run, collect_runs
from approxtrain.compare.table import Row, RunRow, Table, build_rows, sort_tables
from approxtrain.compare.wandb_source import fetch_wandb_runs

__all__ = [
    "Problem",
    "Row",
    "Run",
    "RunRow",
    "Table",
    "build_rows",
    "collect_runs",
    "fetch_wandb_runs",
    "print_sweep_table",
    "print_tables",
    "sort_tables",
    "to_csv",
    "to_json",
    "to_markdown",
    "write_report",
]
