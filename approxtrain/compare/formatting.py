"""Human-readable cells shared by the console table and ``report.md``."""

from __future__ import annotations

from approxtrain.compare.stats import BOOTSTRAP
from approxtrain.compare.table import Row, Stat, Table
from approxtrain.compare.timing import UNRELIABLE_MARK

COLUMNS = (
    "sampler",
    "ratio",
    "layers",
    "compute red.",
    "best metric",
    "Δ vs exact",
    "95 % interval",
    "verdict",
    "step time",
    "speedup",
    "epochs",
    "status",
    "n",
    "overrides",
)


def metric_digits(table: Table) -> int:
    """4 decimals for fraction-like metrics (accuracy), 2 for large ones (perplexity)."""
    values = [abs(row.best_metric.mean) for row in table.rows if row.best_metric.mean is not None]
    return 2 if values and max(values) >= 10 else 4


def format_stat(stat: Stat, digits: int, scale: float = 1.0, unit: str = "", separator: str = " ") -> str:
    """``0.9512 ± 0.0040`` (``separator="\n"`` stacks the std under the mean);
    just the mean for one value; ``-`` for none."""
    if stat.mean is None:
        return "-"
    text = f"{stat.mean * scale:.{digits}f}{unit}"
    return text if stat.std is None else f"{text}{separator}± {stat.std * scale:.{digits}f}{unit}"


def format_delta(row: Row, digits: int) -> str:
    """Signed difference to the baseline, ``baseline`` for exact rows, ``no baseline`` when none matched."""
    if row.is_exact:
        return "baseline"
    if row.baseline.metric is None:
        return "no baseline"
    if row.delta is None:
        return "-"
    return f"{row.delta:+.{digits}f}"


def format_interval(row: Row, digits: int) -> str:
    """``[-0.0120, -0.0010]`` (Welch's t), ``... bootstrap`` (2 seeds a side); ``-`` without one."""
    interval = row.interval
    if interval is None:
        return "-"
    text = f"[{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
    return f"{text} {BOOTSTRAP}" if interval.method == BOOTSTRAP else text


def format_verdict(row: Row) -> str:
    """``better | worse | within noise``; ``-`` for exact rows and rows without an interval."""
    return row.verdict or "-"


INTERVAL_NOTE = ("95 % interval: of Δ vs exact, Welch's t over the seeds of the row and of its "
                 "baseline; 'bootstrap' where a side has 2 seeds (too narrow to trust), none with 1; verdict: "
                 "better or worse when the interval excludes 0, in the metric's direction")


def delta_is_better(row: Row) -> bool | None:
    """Whether the row beats its baseline in the metric's direction; ``None`` when undecidable or exact."""
    if row.is_exact or row.delta is None or row.delta == 0:
        return None
    return (row.delta > 0) == row.first.higher_is_better


def format_speedup(value: float | None, reliable: bool | None = True) -> str:
    """``1.85x``; ``1.85x?`` when the step times behind it are too noisy; ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if reliable is not False else UNRELIABLE_MARK)


def format_ratio(row: Row) -> str:
    ratio = row.first.ratio
    return "-" if row.is_exact or ratio is None else f"{ratio:g}"


def row_cells(row: Row, digits: int, separator: str = " ") -> list[str]:
    """The :data:`COLUMNS` of one row as text; ``separator`` goes between a mean and its ``± std``."""
    first = row.first
    return [
        first.sampler,
        format_ratio(row),
        "-" if row.is_exact else (first.layers or "-"),
        format_stat(row.compute_reduction, 1, scale=100, unit="%", separator=separator),
        format_stat(row.best_metric, digits, separator=separator),
        format_delta(row, digits),
        format_interval(row, digits),
        format_verdict(row),
        format_stat(row.step_time_s, 1, scale=1000, unit=" ms", separator=separator),
        format_speedup(row.speedup, row.speedup_reliable),
        row.epochs,
        first.status,
        str(row.n),
        row.overrides or "-",
    ]


def row_label(row: Row) -> str:
    """Short name of a row for legends and notes: ``topk 0.3 paper``, plus the
    distinguishing overrides beyond sampler, ratio and layers (``trainer.lr=0.05``)."""
    parts = ["exact"] if row.is_exact else [row.first.sampler, format_ratio(row), row.first.layers or ""]
    parts += [item for item in row.overrides.split() if item.split("=", 1)[0] not in _APPROXIMATION_COLUMNS]
    return " ".join(part for part in parts if part)


_APPROXIMATION_COLUMNS = ("sampler", "ratio", "layers")


def row_notes(table: Table) -> list[str]:
    """``label [status]: note`` lines for every row note of the table."""
    return [f"{row_label(row)} [{row.first.status}]: {note}" for row in table.rows for note in row.notes]
