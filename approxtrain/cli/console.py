"""rich output of a training run: config tree, layer plan, progress and summary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.surgery import Plan

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer


def _format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if name == "accuracy" else f"{value:.2f}"


def config_tree(cfg: Mapping[str, Any], order: tuple[str, ...] = ("model", "dataset", "sampler", "layers", "trainer", "logger")) -> Tree:
    """The resolved config as a tree, main groups first."""
    tree = Tree("config", guide_style="dim")

    def add(node: Tree, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, Mapping) or (isinstance(item, list) and item and isinstance(item[0], Mapping)):
                    add(node.add(f"[bold]{key}[/]"), item)
                else:
                    node.add(f"{key}: {item!r}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                add(node.add(f"[{index}]"), item) if isinstance(item, Mapping) else node.add(repr(item))

    keys = [key for key in order if key in cfg] + [key for key in cfg if key not in order]
    scalars = {key: cfg[key] for key in keys if not isinstance(cfg[key], Mapping)}
    for key, value in scalars.items():
        tree.add(f"[bold]{key}[/]: {value!r}")
    for key in keys:
        if isinstance(cfg[key], Mapping):
            branch = tree.add(f"[bold]{key}[/]")
            add(branch, cfg[key])
    return tree


def print_config(console: Console, cfg: Mapping[str, Any], run_dir: Path) -> None:
    """Print the config tree and save it as ``run_dir/config_tree.log``."""
    tree = config_tree(cfg)
    console.print(tree)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config_tree.log", "w") as handle:
        Console(file=handle, width=120, color_system=None).print(tree)


def plan_table(plan: Plan, title: str = "layer plan") -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in (("layer", "left"), ("type", "left"), ("n", "right"), ("k", "right"), ("ratio", "right"),
                            ("policy", "left"), ("MACs/step exact", "right"), ("MACs/step approx", "right"), ("note", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in plan.rows:
        table.add_row(row.name, row.type, str(row.n), str(row.k), f"{row.ratio:.3f}", row.policy,
                      f"{row.exact_macs.total:,}", f"{row.approx_macs.total:,}", row.note)
    table.caption = f"planned compute reduction: {plan.compute_reduction:.1%} (batch {plan.batch_size})"
    return table


class ConsoleCallback(Callback):
    """Prints a run's plan, per-epoch progress bars and summary with rich."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None
        self.last_metric: float | None = None

    def on_start(self, trainer: Trainer) -> None:
        results = trainer.results
        assert trainer.plan is not None
        self.console.print(plan_table(trainer.plan))
        self.console.print(f"training {results.model} on {results.dataset} with sampler={results.sampler} "
                           f"ratio={results.ratio} on {results.device}")

    def _start_epoch(self, trainer: Trainer, epoch: int) -> None:
        metric_name = trainer.results.metric_name
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn(f"{metric_name} {{task.fields[metric]}}"),
            TextColumn("compute reduction {task.fields[reduction]}"), TextColumn("{task.fields[speed]} samples/s"),
            TimeElapsedColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=trainer.steps_per_epoch, epoch=epoch, loss="-",
                                           metric=_format_metric(metric_name, self.last_metric), reduction="-", speed="-")

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        if self.progress is None:
            self._start_epoch(trainer, report.epoch)
        assert self.progress is not None
        self.progress.update(self.task, completed=report.batch, loss=f"{report.loss:.4f}",
                             reduction=f"{report.compute_reduction:.1%}", speed=f"{report.samples_per_s:,.0f}")

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        self._stop_progress()
        self.last_metric = record.test_metric
        metric_name = trainer.results.metric_name
        self.console.print(
            f"epoch {record.epoch:>3}  step {record.step:>6}  train loss {record.train_loss:.4f}  "
            f"test {metric_name} {_format_metric(metric_name, record.test_metric)}  "
            f"compute reduction {record.compute_reduction:.1%}  {record.time_s:.1f} s")

    def on_failure(self, trainer: Trainer, message: str) -> None:
        self._stop_progress()

    def on_end(self, trainer: Trainer) -> None:
        results = trainer.results
        table = Table(title="summary", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        name = results.metric_name
        for key, value in (
            ("status", results.status),
            (f"best {name}", _format_metric(name, results.best_metric)),
            (f"final {name}", _format_metric(name, results.final_metric)),
            ("compute reduction (measured)", f"{results.compute_reduction:.1%}" if results.compute_reduction is not None else "-"),
            ("epochs / steps", f"{len(results.epochs)} / {results.steps}"),
            ("median step time", f"{results.step_time_s * 1000:.1f} ms" if results.step_time_s else "-"),
            ("wall time", f"{results.wall_time_s:.1f} s"),
            ("device", results.device),
        ):
            table.add_row(key, str(value))
        self.console.print(table)
