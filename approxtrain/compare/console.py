"""Rich console output: one table per model/dataset, then notes and problems.

Layout follows the width: from 160 columns a row is one line; narrower, a ``± std``
goes under its mean and headers break; below 120 the overrides and n move out of
the table into numbered lines under it. Output that is not a terminal (a log file, a
pipe) is rendered wide, since nothing there wraps it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from approxtrain.compare.formatting import (
    COLUMNS,
    INTERVAL_NOTE,
    delta_is_better,
    metric_digits,
    row_cells,
    row_notes,
)
from approxtrain.compare.runs import INCOMPLETE, Problem, collect_runs
from approxtrain.compare.stats import BETTER, WORSE
from approxtrain.compare.table import Table, build_rows
from approxtrain.run.schema import FAILED, FINISHED, INTERRUPTED, RUNNING

STATUS_STYLES = {FINISHED: "green", FAILED: "red", RUNNING: "yellow", INTERRUPTED: "cyan", INCOMPLETE: "magenta"}  # every runs.STATUSES
WIDE_CONSOLE = 160
NARROW_CONSOLE = 120
_HEADERS = {"compute red.": "compute\nred.", "best metric": "best\nmetric", "Δ vs exact": "Δ vs\nexact",
            "95 % interval": "95 %\ninterval",
            "step time": "step\ntime (ms)", "speedup": "speed-\nup", "overrides": "#"}
_NUMERIC = {"ratio", "compute red.", "best metric", "Δ vs exact", "95 % interval", "step time", "speedup", "epochs", "n"}
VERDICT_STYLES = {BETTER: "green", WORSE: "red"}


def rich_table(table: Table, width: int = WIDE_CONSOLE) -> RichTable:
    """The rich rendering of one :class:`Table` for a console ``width`` columns wide."""
    stacked, legend = width < WIDE_CONSOLE, width < NARROW_CONSOLE
    columns = [c for c in COLUMNS if not (legend and c == "n")]
    rendered = RichTable(title=table.title, title_justify="left", box=box.SIMPLE_HEAVY,
                         show_lines=stacked, collapse_padding=stacked)
    for column in columns:
        header = _HEADERS.get(column, column) if (stacked and column != "overrides") or legend else column
        rendered.add_column(header, justify="right" if column in _NUMERIC else "left", overflow="fold")
    digits = metric_digits(table)
    for number, row in enumerate(table.rows, start=1):
        cells: dict[str, str | Text] = dict(zip(COLUMNS, row_cells(row, digits, separator="\n" if stacked else " ")))
        cells["Δ vs exact"] = Text(str(cells["Δ vs exact"]), style=_delta_style(delta_is_better(row)))
        cells["verdict"] = Text(str(cells["verdict"]), style=VERDICT_STYLES.get(row.verdict or "", ""))
        cells["status"] = Text(str(cells["status"]), style=STATUS_STYLES.get(row.first.status, ""))
        cells["speedup"] = Text(str(cells["speedup"]), style="yellow" if row.speedup_reliable is False else "")
        if stacked:
            cells["step time"] = str(cells["step time"]).replace(" ms", "")
        if legend:
            cells["overrides"] = str(number)
        rendered.add_row(*(cells[column] for column in columns), style="bold" if row.is_exact else None)
    return rendered


def make_console() -> Console:
    """A stdout console; 200 columns wide when stdout is not a terminal and COLUMNS is unset."""
    console = Console(highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = max(console.width, 200)
    return console


def print_tables(tables: Sequence[Table], problems: Sequence[Problem], console: Console | None = None) -> None:
    """Print every table with its notes, then the problems (never raises on bad rows)."""
    console = console or make_console()
    width = console.width
    if not tables:
        console.print("[yellow]No runs to compare.[/yellow]")
    for table in tables:
        console.print(rich_table(table, width))
        if width < NARROW_CONSOLE:
            for number, row in enumerate(table.rows, start=1):
                line = f"  #{number} (n={row.n}): {row.overrides or '-'}"
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        if any(row.interval is not None for row in table.rows):
            console.print(Text(f"  {INTERVAL_NOTE}", style="dim"), highlight=False, soft_wrap=True)
        for note in row_notes(table):
            console.print(Text.assemble(("  note: ", "dim"), note), highlight=False, soft_wrap=True)
        for warning in table.warnings:
            console.print(Text.assemble(("  warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
        console.print()
    print_problems(problems, console)


def print_problems(problems: Sequence[Problem], console: Console) -> None:
    """One red line per problem."""
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/bold red]")
    for problem in problems:
        console.print(Text(f"  {problem}", style="red"), soft_wrap=True)


def print_sweep_table(sweep_dir: Path | str, console: Console | None = None, report_dir: Path | None = None) -> None:
    """Print the comparison table of the runs under ``sweep_dir`` (end of a multirun);
    with ``report_dir`` also write the report folder there."""
    runs, problems = collect_runs([Path(sweep_dir)])
    tables = build_rows(runs)
    console = console or make_console()
    print_tables(tables, problems, console)
    if report_dir is not None:
        from approxtrain.compare.report import write_report

        write_report(tables, problems, Path(report_dir))
        console.print(f"report written to {report_dir}", highlight=False, soft_wrap=True)


def _delta_style(better: bool | None) -> str:
    return {True: "green", False: "red"}.get(better, "") if better is not None else ""
