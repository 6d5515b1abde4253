"""Machine- and human-readable outputs: Markdown, CSV, JSON and the report folder.

The report folder holds ``report.md`` (the tables, notes, problems and both figures),
``pareto.png``, ``curves.png`` (plus ``.pdf``/``.svg`` copies on request) and
``runs.csv`` (one line per run, then one per problem with status ``broken``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from approxtrain.compare.formatting import COLUMNS, INTERVAL_NOTE, metric_digits, row_cells, row_notes
from approxtrain.compare.runs import Problem
from approxtrain.compare.table import RUN_RECORD_FIELDS, Table
from approxtrain.run.rundir import atomic_write

FIGURE_FORMATS = ("png", "pdf", "svg")  # PNG is always written: report.md shows it


def run_records(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """Every run of every table as a flat record."""
    return [row.as_record() for table in tables for row in table.run_rows]


def to_json(tables: Sequence[Table], problems: Sequence[Problem]) -> str:
    """``{"tables": [...aggregated rows...], "runs": [...], "problems": [{"path", "message"}]}``."""
    document = {
        "tables": [table.as_record() for table in tables],
        "runs": run_records(tables),
        "problems": [{"path": p.path, "message": p.message} for p in problems],
    }
    return json.dumps(document, indent=2, default=str)


def to_csv(tables: Sequence[Table], problems: Sequence[Problem]) -> str:
    """One CSV line per run, then one per problem (``status=broken``, message in ``error``)."""
    records = run_records(tables)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    for problem in problems:
        writer.writerow({"path": problem.path, "status": "broken", "error": problem.message})
    return buffer.getvalue()


def to_markdown(tables: Sequence[Table], problems: Sequence[Problem], images: bool = False) -> str:
    """The tables as Markdown, with notes, problems and (``images=True``) the two plots."""
    lines = ["# approxtrain comparison", ""]
    if not tables:
        lines += ["No runs to compare.", ""]
    for table in tables:
        lines += _markdown_table(table)
    if images and tables:
        lines += ["## Plots", "", "![metric vs compute reduction](pareto.png)", ""]
        lines += ["![test metric per epoch](curves.png)", ""]
    if problems:
        lines += [f"## Problems ({len(problems)})", ""]
        lines += [f"- `{p.path}`: {_escape(p.message)}" for p in problems] + [""]
    return "\n".join(lines)


def write_report(
    tables: Sequence[Table], problems: Sequence[Problem], out_dir: Path, figure_formats: Sequence[str] = ("png",)
) -> dict[str, Path]:
    """Write ``report.md``, ``runs.csv`` and the figures into ``out_dir`` (created): each
    figure as PNG and in the other :data:`FIGURE_FORMATS` of ``figure_formats``; returns
    file name -> path. Every file is written atomically into the resolved ``out_dir``: a
    symbolic link in its place is replaced by the file, its target left alone."""
    from approxtrain.compare.plots import write_figures  # matplotlib only when writing
    from approxtrain.compare.telemetry_plot import LAYER_ERROR_FILE, write_layer_error_png

    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    formats = ["png"] + [fmt for fmt in FIGURE_FORMATS[1:] if fmt in figure_formats]
    paths = {"runs.csv": write_text(out_dir / "runs.csv", to_csv(tables, problems))}
    paths.update(write_figures(tables, out_dir, formats))
    markdown = to_markdown(tables, problems, images=True)
    if layer_error := write_layer_error_png(tables, out_dir / LAYER_ERROR_FILE):  # runs with telemetry only
        paths[LAYER_ERROR_FILE] = layer_error
        markdown += f"\n![per-layer forward error (telemetry)]({LAYER_ERROR_FILE})\n"
    paths["report.md"] = write_text(out_dir / "report.md", markdown)
    return paths


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) as ``path`` atomically (a link at ``path`` is replaced, not followed)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def _markdown_table(table: Table) -> list[str]:
    digits = metric_digits(table)
    lines = [f"## {table.title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_escape(cell) for cell in row_cells(row, digits)) + " |" for row in table.rows]
    if any(row.interval is not None for row in table.rows):
        lines += ["", _escape(INTERVAL_NOTE)]
    notes = row_notes(table)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {_escape(note)}" for note in notes]
    if table.warnings:
        lines += ["", "Warnings:", ""] + [f"- {_escape(warning)}" for warning in table.warnings]
    return lines + [""]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
