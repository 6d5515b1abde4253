"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display).

``pareto``: best metric against compute reduction, one series per sampler in its
fixed colour (:mod:`approxtrain.compare.style`), hollow markers for rows that have not
finished and each point's ratio beside it. A row's vertical bar is the 95 % interval of its
difference to exact (:mod:`approxtrain.compare.stats`) drawn from the exact mean, so a bar
that crosses the exact row's dotted line is ``within noise``; rows without an interval (one
seed, no baseline) have none. Horizontal bars: +-1 sample std of the compute reduction. The
exact baseline is a black star on its dotted line; the dashed grey line is the Pareto front
of the finished rows -- more reduction and a better metric in its own direction (higher
accuracy, lower perplexity).
``curves``: mean test metric per epoch of every row with a +-1 std band over seeds;
the sampler gives the colour, the rest of the row (ratio, other overrides) the line
style, exact is thick black.
Each is written as PNG and, on request, PDF and/or SVG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from approxtrain.compare.formatting import format_ratio, row_label
from approxtrain.compare.style import (
    ANNOTATION_SIZE,
    BAND_ALPHA,
    EXACT_COLOR,
    FIGURE_WIDTH_IN,
    PANEL_HEIGHT_IN,
    PARETO_COLOR,
    PNG_DPI,
    RC_PARAMS,
    sampler_color,
)
from approxtrain.compare.table import Row, Stat, Table, seed_stat
from approxtrain.run.rundir import atomic_write
from approxtrain.run.schema import FAILED, FINISHED

LINESTYLES = ("-", "--", "-.", ":")
LEGEND_COLUMNS = 3
LEGEND_LINE_CHARS = 95  # characters of legend text that fit across the figure
LEGEND_HANDLE_CHARS = 7  # a handle and the gap after it, in characters
LEGEND_ROW_IN = 0.2
PARETO_LABEL = "Pareto front"
PARETO_BARS = "bars: 95 % interval of Δ vs exact, around the exact mean (Welch's t; 2 seeds: bootstrap)"
SPREAD = "bands: ±1 std over seeds"


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


def write_figures(tables: Sequence[Table], out_dir: Path, formats: Sequence[str] = ("png",)) -> dict[str, Path]:
    """Draw :data:`FIGURES` (one panel per table) and save each as ``<name>.<format>`` in
    ``out_dir`` for every one of ``formats`` (matplotlib's names: png, pdf, svg); returns
    file name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with rc_context(RC_PARAMS):
        for name, draw in FIGURES.items():
            figure = _figure(tables, draw)
            for fmt in formats:
                path = out_dir / f"{name}.{fmt}"
                atomic_write(path, lambda handle, fmt=fmt: figure.savefig(handle, format=fmt, dpi=PNG_DPI if fmt == "png" else None))  # noqa: B023 - called at once
                paths[path.name] = path
    return paths


def _figure(tables: Sequence[Table], draw: Callable[[Axes, Table], int]) -> Figure:
    """A figure with one panel per table, each sized for its legend's rows."""
    figure = Figure(figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN), layout="constrained")
    FigureCanvasAgg(figure)
    if not tables:
        figure.text(0.5, 0.5, "no runs to plot", ha="center", va="center")
        return figure
    panels = figure.subplots(len(tables), 1, squeeze=False)[:, 0]
    legend_rows = [draw(axes, table) for axes, table in zip(panels, tables)]
    figure.set_figheight(sum(PANEL_HEIGHT_IN + LEGEND_ROW_IN * rows for rows in legend_rows))
    return figure


def _legend(axes: Axes, title: str = SPREAD) -> int:
    """The legend under the panel (it never covers a point); returns its number of rows."""
    entries = sorted(zip(*axes.get_legend_handles_labels()), key=lambda entry: entry[1] == PARETO_LABEL)
    if not entries:
        return 0
    handles, labels = zip(*entries)  # the series first, the Pareto front last
    longest = max(len(label) for label in labels) + LEGEND_HANDLE_CHARS
    columns = max(1, min(LEGEND_COLUMNS, len(handles), LEGEND_LINE_CHARS // longest))
    axes.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=columns,
                title=title, title_fontsize="small", frameon=False)
    return -(-len(handles) // columns) + 1


def _plottable(table: Table) -> list[Row]:
    return [
        row
        for row in table.rows
        if row.first.status != FAILED and row.best_metric.mean is not None and row.compute_reduction.mean is not None
    ]


def _draw_pareto(axes: Axes, table: Table) -> int:
    rows = _plottable(table)
    for sampler in sorted({row.first.sampler for row in rows if not row.is_exact}):
        _draw_series(axes, [r for r in rows if r.first.sampler == sampler], sampler)
    for row in (r for r in rows if r.is_exact):
        _draw_baseline(axes, row)
    finished = [r for r in rows if r.first.status == FINISHED]
    points = [(r.compute_reduction.mean, r.best_metric.mean) for r in finished]
    front = [points[i] for i in pareto_front(points, table.higher_is_better)]
    if len(front) > 1:
        axes.plot([p[0] for p in front], [p[1] for p in front], color=PARETO_COLOR, linestyle="--",
                  linewidth=1.2, zorder=1, label=PARETO_LABEL)
    axes.set(title=table.title, xlabel="compute reduction (MACs saved)", ylabel=f"best {table.metric_name}")
    axes.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.grid(alpha=0.3)
    return _legend(axes, PARETO_BARS)


def _draw_baseline(axes: Axes, row: Row) -> None:
    """The exact row: a star on a dotted line at its mean (its spread is in the other rows' intervals)."""
    axes.errorbar([row.compute_reduction.mean], [row.best_metric.mean], xerr=[row.compute_reduction.std or 0],
                  fmt="*", markersize=14, color=EXACT_COLOR, capsize=4, zorder=5,
                  label=f"{row_label(row)} [{row.first.status}] n={row.n}")
    axes.axhline(row.best_metric.mean, color=EXACT_COLOR, linestyle=":", linewidth=1)


def interval_bar(row: Row) -> tuple[float, float]:
    """How far the row's bar reaches below and above its mean: its interval of Δ vs exact placed
    at the exact mean (``baseline + low`` to ``baseline + high``); ``(0, 0)`` without an interval."""
    interval, mean, baseline = row.interval, row.best_metric.mean, row.baseline.metric
    if interval is None or mean is None or baseline is None:
        return 0.0, 0.0
    return max(mean - (baseline + interval.low), 0.0), max(baseline + interval.high - mean, 0.0)


def _draw_series(axes: Axes, rows: list[Row], sampler: str) -> None:
    color = sampler_color(sampler)
    for status_finished in (True, False):
        chosen = [r for r in rows if (r.first.status == FINISHED) == status_finished]
        if not chosen:
            continue
        axes.errorbar(
            [r.compute_reduction.mean for r in chosen],
            [r.best_metric.mean for r in chosen],
            xerr=[r.compute_reduction.std or 0 for r in chosen],
            yerr=[list(bar) for bar in zip(*(interval_bar(r) for r in chosen))],
            fmt="o", markersize=6, color=color, mfc=color if status_finished else "none", capsize=3,
            label=sampler if status_finished else f"{sampler} (not finished)",
        )
        for row in chosen:
            if row.first.ratio is not None:
                axes.annotate(f"{row.first.ratio:g}", (row.compute_reduction.mean, row.best_metric.mean),
                              textcoords="offset points", xytext=(5, 4), fontsize=ANNOTATION_SIZE, color=color)


def _draw_curves(axes: Axes, table: Table) -> int:
    variants = sorted({_variant(row) for row in table.rows if not row.is_exact})
    for row in table.rows:
        epochs, stats = curve_stats(row)
        if not epochs:
            continue
        label = f"{row_label(row)} [{row.first.status}]"
        if row.is_exact:
            color, style, width = EXACT_COLOR, "-", 2.5
        else:
            color, width = sampler_color(row.first.sampler), None
            style = LINESTYLES[variants.index(_variant(row)) % len(LINESTYLES)]
        means = [s.mean for s in stats]
        axes.plot(epochs, means, color=color, linestyle=style, linewidth=width, marker=".", label=label)
        spread = [(e, s.mean - s.std, s.mean + s.std) for e, s in zip(epochs, stats) if s.std is not None]
        if spread:
            axes.fill_between([p[0] for p in spread], [p[1] for p in spread], [p[2] for p in spread],
                              color=color, alpha=BAND_ALPHA, linewidth=0)
    axes.set(title=table.title, xlabel="epoch", ylabel=f"test {table.metric_name}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    return _legend(axes)


def _variant(row: Row) -> tuple[str, ...]:
    """What tells a row from the others of its sampler (ratio, layers, other overrides): its line style."""
    return (format_ratio(row), *(item for item in row.overrides.split() if not item.startswith("sampler=")))


def curve_stats(row: Row) -> tuple[list[int], list[Stat]]:
    """The test metric at each epoch any of the row's runs reached: mean and std over
    seeds (runs repeated under one seed averaged first)."""
    by_epoch: dict[int, dict[int | None, list[float]]] = {}
    for seed, runs in row.by_seed.items():
        for run in runs:
            for epoch, value in run.curve:
                by_epoch.setdefault(epoch, {}).setdefault(seed, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [seed_stat(by_epoch[e].values()) for e in epochs]


FIGURES: dict[str, Callable[[Axes, Table], int]] = {"pareto": _draw_pareto, "curves": _draw_curves}
