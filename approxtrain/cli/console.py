"""rich output of a training run: config tree, layer plan, progress and summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.run.rundir import BEST_CHECKPOINT, checkpoint_path
from approxtrain.run.schema import VALIDATION
from approxtrain.surgery import Plan

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer

log = logging.getLogger("approxtrain")
RATE_WINDOW_S = 10.0  # the seconds that it/s and the remaining time are averaged over


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


def plan_table(plan: Plan, title: str = "layer plan", coverage: float | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in (("layer", "left"), ("type", "left"), ("n", "right"), ("k", "right"), ("ratio", "right"),
                            ("policy", "left"), ("MACs/step exact", "right"), ("MACs/step approx", "right"), ("note", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in plan.rows:
        table.add_row(row.name, row.type, str(row.n), str(row.k), f"{row.ratio:.3f}", row.policy,
                      f"{row.exact_macs.total:,}", f"{row.approx_macs.total:,}", row.note)
    table.caption = f"planned compute reduction: {plan.compute_reduction:.1%} (batch {plan.batch_size})" + _coverage(coverage)
    return table


def _coverage(coverage: float | None) -> str:
    """``, coverage 42.0% of the step's products`` (what the reduction is a share of), or nothing when unknown."""
    return f", coverage {coverage:.1%} of the step's products" if coverage is not None else ""


def epochs_planned(trainer: Trainer) -> int:
    """The epochs the run trains: ``trainer.epochs``, fewer when ``trainer.max_steps`` ends it sooner."""
    epochs, max_steps = trainer.spec.trainer.epochs, trainer.spec.trainer.max_steps
    return epochs if max_steps is None else min(epochs, math.ceil(max_steps / max(trainer.steps_per_epoch, 1)))


def epoch_line(record: EpochRecord, epochs: int, metric_name: str) -> str:
    return (f"epoch {record.epoch}/{epochs}  step {record.step}  train loss {record.train_loss:.4f}  "
            f"test {metric_name} {_format_metric(metric_name, record.test_metric)}  "
            f"compute reduction {record.compute_reduction:.1%}  {record.time_s:.1f} s")


class RateColumn(ProgressColumn):
    """Steps per second over the last :data:`RATE_WINDOW_S` seconds (rich's speed estimate)."""

    def render(self, task: Task) -> Text:
        return Text("-- it/s" if task.speed is None else f"{task.speed:.1f} it/s", style="progress.data.speed")


class ConsoleCallback(Callback):
    """Prints a run's plan, a progress bar per epoch (epoch i/N, elapsed and remaining time, it/s,
    moved every step without reading the device; the loss at logging steps) and one per evaluation,
    and the summary, which names the run dir and the best checkpoint. The start, epoch and end
    lines also go through ``logging``, so ``train.log`` is the run's log."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.train_task: Any = None
        self.eval_task: Any = None
        self.last_metric: float | None = None

    def on_start(self, trainer: Trainer) -> None:
        results = trainer.results
        assert trainer.plan is not None
        self.console.print(plan_table(trainer.plan, coverage=results.coverage))
        log.info("training %s on %s with sampler=%s ratio=%s on %s: %d epoch(s) of %d steps, into %s", results.model,
                 results.dataset, results.sampler, results.ratio, results.device, epochs_planned(trainer),
                 trainer.steps_per_epoch, trainer.run_dir)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        done = trainer.state.progress.batches if trainer.state.progress else 0  # a run resumed inside this epoch
        total = trainer.steps_per_epoch
        max_steps = trainer.spec.trainer.max_steps
        if max_steps is not None:
            total = min(total, done + max_steps - trainer.state.step)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("•"),
            TimeRemainingColumn(), RateColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=True, speed_estimate_period=RATE_WINDOW_S,
            disable=not self.console.is_terminal)  # a log file or pipe gets the epoch lines only
        self.progress.start()
        metric_name = trainer.results.metric_name
        self.train_task = self.progress.add_task(
            f"epoch {epoch}/{epochs_planned(trainer)}", total=total, completed=done,
            info=f"{metric_name} {_format_metric(metric_name, self.last_metric)}")
        self.eval_task = None

    def on_train_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        if self.progress is not None:
            self.progress.update(self.train_task, completed=batch)

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        if self.progress is not None:
            metric_name = trainer.results.metric_name
            self.progress.update(self.train_task, info=(
                f"loss {report.loss:.4f}  {metric_name} {_format_metric(metric_name, self.last_metric)}  "
                f"compute reduction {report.compute_reduction:.1%}  {report.samples_per_s:,.0f} samples/s"))

    def on_eval_batch_end(self, trainer: Trainer, batch: int, total: int) -> None:
        if self.progress is None:
            return
        if self.eval_task is None:
            self.eval_task = self.progress.add_task("evaluate", total=total, info="")
        self.progress.update(self.eval_task, completed=batch, total=total)  # validation, then test: each its own count

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        self._stop_progress()
        self.last_metric = record.test_metric
        log.info(epoch_line(record, epochs_planned(trainer), trainer.results.metric_name))

    def on_failure(self, trainer: Trainer, message: str) -> None:
        self._stop_progress()

    def on_end(self, trainer: Trainer) -> None:
        self._stop_progress()  # interrupted inside an epoch
        results = trainer.results
        best = checkpoint_path(trainer.run_dir, BEST_CHECKPOINT)
        best_checkpoint = str(best) if best.is_file() else "-"
        reduction = f"{results.compute_reduction:.1%}{_coverage(results.coverage)}" if results.compute_reduction is not None else "-"
        table = Table(title="summary", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        name = results.metric_name
        chosen = f"epoch {results.best_epoch}, chosen on {results.selected_on}" if results.best_epoch else "-"
        for key, value in (
            ("status", results.status),
            (f"best {name} (test)", f"{_format_metric(name, results.test_metric_at_best)} ({chosen})"),
            (f"best validation {name}", _format_metric(name, results.best_metric) if results.selected_on == VALIDATION else "-"),
            (f"final {name}", _format_metric(name, results.final_metric)),
            ("compute reduction (measured)", reduction),
            ("epochs / steps", f"{len(results.epochs)} / {results.steps}"),
            ("median step time", f"{results.step_time_s * 1000:.1f} ms" if results.step_time_s else "-"),
            ("wall time", f"{results.wall_time_s:.1f} s"),
            ("device", results.device),
            ("run dir", str(trainer.run_dir)),
            ("best checkpoint", best_checkpoint),
        ):
            table.add_row(key, str(value))
        self.console.print(table)
        log.info("%s: best %s %s (test, %s), compute reduction %s; run dir %s; best checkpoint %s", results.status, name,
                 _format_metric(name, results.test_metric_at_best), chosen, reduction, trainer.run_dir, best_checkpoint)
