"""``approxtrain-compare``: compare approximate runs with their exact baselines.

Reads run dirs (``results.json`` + ``.hydra/config.yaml``) below the given paths, or
a W&B project with ``--wandb``, prints one table per model/dataset and writes a
report folder. Exit codes: 0 done (broken runs are reported, not fatal), 1 W&B
unreachable, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from approxtrain.compare.console import make_console, print_tables
from approxtrain.compare.report import FIGURE_FORMATS, to_csv, to_json, to_markdown, write_report
from approxtrain.compare.runs import HYDRA_DIR, SWEEP_FILE, Problem, Run, collect_runs
from approxtrain.compare.selection import (
    UsageError,
    apply_filters,
    check_filter_keys,
    check_sort_key,
    parse_filter,
)
from approxtrain.compare.table import DEFAULT_MIN_SEEDS, SORT_KEYS, Table, build_rows, sort_tables
from approxtrain.compare.wandb_source import WandbSourceError, fetch_wandb_runs
from approxtrain.run.schema import RESULTS_FILE

PROG = "approxtrain-compare"
FORMATS = ("table", "json", "csv", "md")
REPORTS_DIR = Path("reports")


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog=PROG,
        description="Compare approximate-training runs with their exact baselines "
        "(compute reduction, metric delta, speedup), aggregated over seeds.",
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="run dirs, sweep dirs or a whole outputs/ folder (searched recursively)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API instead")
    parser.add_argument("--group", metavar="G", help="with --wandb: only runs of this group (one sweep)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="report folder (default: <sweep or run dir>/report for one such dir, "
                        "else reports/compare_<timestamp>)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report folder")
    parser.add_argument("--figure-format", default="png",
                        metavar="FMT[,FMT]", help=f"figure formats, from {', '.join(FIGURE_FORMATS)}; png is "
                        "always written (report.md shows it), e.g. --figure-format pdf,svg for a paper")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="stdout format; json/csv/md write a report only with an explicit --out")
    parser.add_argument("--sort", metavar="KEY", help=f"sort rows by one of: {', '.join(SORT_KEYS)}")
    parser.add_argument("--reverse", action="store_true", help="sort descending")
    parser.add_argument("--filter", dest="filters", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs whose field or dotted config key equals VALUE (a,b: either); repeatable")
    parser.add_argument("--min-seeds", type=_min_seeds, default=DEFAULT_MIN_SEEDS, metavar="N",
                        help=f"warn about rows with fewer than N seeds (default {DEFAULT_MIN_SEEDS}): their "
                        "intervals are a bootstrap (2 seeds) or absent (1)")
    return parser


def _min_seeds(text: str) -> int:
    """``--min-seeds``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except WandbSourceError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


def _run(args: argparse.Namespace) -> int:
    check_sort_key(args.sort)
    figure_formats = _figure_formats(args.figure_format)
    filters = [parse_filter(text) for text in args.filters]
    runs, problems = _load(args)
    if runs:
        check_filter_keys(filters, runs)
    tables = sort_tables(build_rows(runs, apply_filters(runs, filters), args.min_seeds), args.sort, args.reverse)
    _print(tables, problems, args.format)
    if args.format in ("json", "csv"):  # the table and report.md show them with the rows
        for table in tables:
            for warning in table.warnings:
                print(f"warning: {table.model}/{table.dataset}: {warning}", file=sys.stderr)
    out_dir = _report_dir(args)
    if out_dir is not None:
        paths = write_report(tables, problems, out_dir, figure_formats)
        _info(f"report written to {paths['report.md'].parent}", args.format)
    return 0


def _load(args: argparse.Namespace) -> tuple[list[Run], list[Problem]]:
    if args.wandb and args.paths:
        raise UsageError("give run PATHs or --wandb ENTITY/PROJECT, not both")
    if args.group and not args.wandb:
        raise UsageError(f"--group {args.group!r} needs --wandb ENTITY/PROJECT")
    if args.wandb:
        return fetch_wandb_runs(args.wandb, args.group)
    if not args.paths:
        raise UsageError("no PATH given; pass run dirs, sweep dirs or outputs/ (or --wandb ENTITY/PROJECT)")
    for path in args.paths:
        if not path.exists():
            raise UsageError(f"path does not exist: {path}")
        if path.is_file() and path.name != RESULTS_FILE:
            raise UsageError(f"not a directory: {path}; expected a run dir, sweep dir or outputs/")
    return collect_runs(args.paths)


def _print(tables: list[Table], problems: list[Problem], fmt: str) -> None:
    if fmt == "table":
        print_tables(tables, problems, make_console())
        return
    render = {"json": to_json, "csv": to_csv, "md": to_markdown}[fmt]
    sys.stdout.write(render(tables, problems).rstrip("\n") + "\n")


def _figure_formats(text: str) -> tuple[str, ...]:
    """``pdf,svg`` -> ``("pdf", "svg")``; raises :class:`UsageError` naming a bad format."""
    formats = tuple(item.strip().lower() for item in text.split(",") if item.strip())
    bad = [fmt for fmt in formats if fmt not in FIGURE_FORMATS]
    if bad or not formats:
        raise UsageError(f"bad --figure-format {text!r}; allowed: {', '.join(FIGURE_FORMATS)} (comma-separated)")
    return formats


def _report_dir(args: argparse.Namespace) -> Path | None:
    """Where the report goes, or ``None`` when it is skipped."""
    if args.no_report or (args.format != "table" and args.out is None):
        return None
    if args.out is not None:
        return args.out
    if len(args.paths) == 1:
        path = args.paths[0]
        if path.is_file():
            path = path.parent
        if (path / SWEEP_FILE).is_file() or (path / HYDRA_DIR).is_dir() or (path / RESULTS_FILE).is_file():
            report = path / "report"
            if report.is_symlink():  # the report goes into the run dir, never to where a link points
                raise UsageError(f"{report} is a symbolic link (to {os.readlink(report)}); the report is written only "
                                 "into a real folder inside the run dir: remove the link, or pass --out DIR")
            return report
    return REPORTS_DIR / f"compare_{datetime.now():%Y%m%d_%H%M%S}"


def _info(message: str, fmt: str) -> None:
    """Status lines go to stdout with the table, to stderr when stdout is machine-readable."""
    print(message, file=sys.stdout if fmt == "table" else sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
