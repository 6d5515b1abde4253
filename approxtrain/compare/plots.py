"""``pareto.png`` and ``curves.png``, drawn with matplotlib's Agg canvas (no pyplot, no display).

Pareto plot: best metric against compute reduction, one series per sampler (hollow
markers for rows that have not finished), the exact baseline as a black star and a
dashed line, and the Pareto front of the finished rows -- more reduction and a better
metric in its own direction (higher accuracy, lower perplexity).
Curves plot: mean test metric per epoch of every row, exact in thick black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from approxtrain.compare.formatting import row_label
from approxtrain.compare.table import Row, Table
from approxtrain.run.schema import FAILED, FINISHED

LINESTYLES = ("-", "--", "-.", ":")


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point dominates (x: more is better; y: per direction),
    ordered by x."""
    sign = 1.0 if higher_is_better else -1.0
    scored = [(x, sign * y) for x, y in points]
    front = [
        i
        for i, (x, y) in enumerate(scored)
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in scored)
    ]
    return sorted(front, key=lambda i: points[i][0])


def write_pareto_png(tables: Sequence[Table], path: Path) -> Path:
    """Draw the Pareto plot of every table (one panel each) into ``path``."""
    figure = _figure(len(tables))
    for axes, table in zip(_panels(figure, len(tables)), tables):
        _draw_pareto(axes, table)
    return _save(figure, path)


def write_curves_png(tables: Sequence[Table], path: Path) -> Path:
    """Draw the per-epoch test metric of every row (one panel per table) into ``path``."""
    figure = _figure(len(tables))
    for axes, table in zip(_panels(figure, len(tables)), tables):
        _draw_curves(axes, table)
    return _save(figure, path)


def _figure(panels: int) -> Figure:
    figure = Figure(figsize=(8, 4.5 * max(panels, 1)), layout="constrained")
    FigureCanvasAgg(figure)
    if panels == 0:
        figure.text(0.5, 0.5, "no runs to plot", ha="center", va="center")
    return figure


def _panels(figure: Figure, count: int) -> list[Axes]:
    return [figure.add_subplot(count, 1, i + 1) for i in range(count)]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def _plottable(table: Table) -> list[Row]:
    return [
        row
        for row in table.rows
        if row.first.status != FAILED and row.best_metric.mean is not None and row.compute_reduction.mean is not None
    ]


def _draw_pareto(axes: Axes, table: Table) -> None:
    rows = _plottable(table)
    samplers = sorted({row.first.sampler for row in rows if not row.is_exact})
    colors = {sampler: f"C{i % 10}" for i, sampler in enumerate(samplers)}
    for sampler in samplers:
        _draw_series(axes, [r for r in rows if r.first.sampler == sampler], colors[sampler], sampler)
    for row in (r for r in rows if r.is_exact):
        axes.scatter([row.compute_reduction.mean], [row.best_metric.mean], marker="*", s=220, color="black",
                     zorder=5, label=f"{row_label(row)} [{row.first.status}]")
        axes.axhline(row.best_metric.mean, color="black", linestyle=":", linewidth=1)
    finished = [r for r in rows if r.first.status == FINISHED]
    points = [(r.compute_reduction.mean, r.best_metric.mean) for r in finished]
    front = [points[i] for i in pareto_front(points, table.higher_is_better)]
    if len(front) > 1:
        axes.plot([p[0] for p in front], [p[1] for p in front], color="grey", linestyle="--",
                  linewidth=1.2, zorder=1, label="Pareto front")
    axes.set(title=table.title, xlabel="compute reduction (fraction of MACs saved)", ylabel=f"best {table.metric_name}")
    axes.grid(alpha=0.3)
    if rows:
        axes.legend(fontsize="small")


def _draw_series(axes: Axes, rows: list[Row], color: str, label: str) -> None:
    for status_finished in (True, False):
        chosen = [r for r in rows if (r.first.status == FINISHED) == status_finished]
        if not chosen:
            continue
        axes.errorbar(
            [r.compute_reduction.mean for r in chosen],
            [r.best_metric.mean for r in chosen],
            xerr=[r.compute_reduction.std or 0 for r in chosen],
            yerr=[r.best_metric.std or 0 for r in chosen],
            fmt="o", color=color, mfc=color if status_finished else "none", capsize=3,
            label=label if status_finished else f"{label} (not finished)",
        )
        for row in chosen:
            if row.first.ratio is not None:
                axes.annotate(f"{row.first.ratio:g}", (row.compute_reduction.mean, row.best_metric.mean),
                              textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)


def _draw_curves(axes: Axes, table: Table) -> None:
    samplers = sorted({row.first.sampler for row in table.rows if not row.is_exact})
    ratios = sorted({row.first.ratio for row in table.rows if row.first.ratio is not None and not row.is_exact})
    drawn = False
    for row in table.rows:
        epochs, values = _mean_curve(row)
        if not epochs:
            continue
        drawn = True
        if row.is_exact:
            axes.plot(epochs, values, color="black", linewidth=2.5, label=f"{row_label(row)} [{row.first.status}]")
            continue
        color = f"C{samplers.index(row.first.sampler) % 10}"
        style = LINESTYLES[ratios.index(row.first.ratio) % len(LINESTYLES)] if row.first.ratio in ratios else "-"
        axes.plot(epochs, values, color=color, linestyle=style, marker=".",
                  label=f"{row_label(row)} [{row.first.status}]")
    axes.set(title=table.title, xlabel="epoch", ylabel=f"test {table.metric_name}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize="small")


def _mean_curve(row: Row) -> tuple[list[int], list[float]]:
    """Mean over the row's runs of the test metric at each epoch any of them reached."""
    by_epoch: dict[int, list[float]] = {}
    for run in row.runs:
        for epoch, value in run.curve:
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
