"""``layer_error.png``: the per-layer approximation error of the runs that recorded telemetry.

One panel per compared row whose runs ran with ``trainer.telemetry_every > 0``: the relative
error of each sampled layer's forward product against the exact one, per training step
(mean over the row's seeds), one line per layer. Read from the runs' ``results.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from approxtrain.compare.formatting import row_label
from approxtrain.compare.table import Row, Table
from approxtrain.run.rundir import atomic_write
from approxtrain.run.schema import read_results

LAYER_ERROR_FILE = "layer_error.png"
MEASURE = "forward_error"


def layer_series(row: Row) -> dict[str, tuple[list[int], list[float]]]:
    """Per layer: the steps measured and the mean ``forward_error`` over the row's runs at each."""
    values: dict[str, dict[int, list[float]]] = {}
    for run in row.runs:
        results = read_results(run.path) if Path(run.path).is_dir() else None
        for entry in (results or {}).get("telemetry") or []:
            if entry.get(MEASURE) is not None:
                values.setdefault(entry["layer"], {}).setdefault(entry["step"], []).append(entry[MEASURE])
    return {layer: (sorted(by_step), [sum(by_step[s]) / len(by_step[s]) for s in sorted(by_step)])
            for layer, by_step in values.items()}


def write_layer_error_png(tables: Sequence[Table], path: Path) -> Path | None:
    """Draw the layer-error panels into ``path``; None (nothing written) when no run has telemetry."""
    panels = [(table, row, series) for table in tables for row in table.rows if (series := layer_series(row))]
    if not panels:
        return None
    figure = Figure(figsize=(8, 4 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (table, row, series) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        for layer, (steps, errors) in series.items():
            axes.plot(steps, errors, marker=".", label=layer)
        axes.set(title=f"{table.title}: {row_label(row)}", xlabel="step", ylabel="forward relative error")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    return path
