"""The run's console: a progress bar that moves every step without reading the device, an
evaluation bar, epoch lines through ``logging`` (so ``train.log`` is the run's log) and a
summary that names the run dir and the best checkpoint."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from approxtrain.cli.console import ConsoleCallback
from approxtrain.run.trainer import Trainer

DIGITS = ("model=mlp", "dataset=digits", "dataset.batch_size=200", "dataset.eval_batch_size=100")


class RecordingConsole(ConsoleCallback):
    """The console callback, noting its bars' (description, completed, total) at every update."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.train_updates: list[tuple[str, int, int]] = []
        self.eval_updates: list[tuple[int, int]] = []
        self.step_reports: list[int] = []

    def on_step(self, trainer, report) -> None:
        super().on_step(trainer, report)
        self.step_reports.append(report.step)

    def on_train_batch_end(self, trainer, epoch, batch) -> None:
        assert type(epoch) is int and type(batch) is int
        super().on_train_batch_end(trainer, epoch, batch)
        task = self.progress.tasks[0]
        self.train_updates.append((task.description, task.completed, task.total))

    def on_eval_batch_end(self, trainer, batch, total) -> None:
        super().on_eval_batch_end(trainer, batch, total)
        task = self.progress.tasks[1]
        self.eval_updates.append((task.completed, task.total))


def test_bars_move_every_step_and_the_loss_is_read_only_at_logging_steps(run_cfg, run_dir):
    """The per-step hook gets counts only (nothing from the device); the loss comes with the logging steps."""
    console = RecordingConsole(Console(file=io.StringIO(), width=200))
    trainer = Trainer(run_cfg(*DIGITS, "trainer.epochs=2", "trainer.log_every_n_steps=1000"), run_dir, [console])
    results = trainer.fit()
    steps = trainer.steps_per_epoch
    assert console.train_updates == [(f"epoch {epoch}/2", batch, steps) for epoch in (1, 2) for batch in range(1, steps + 1)]
    # each epoch evaluates the validation split, then the test set
    per_epoch = [(batch, total) for loader in (trainer.val_loader, trainer.test_loader)
                 for total in [-(-len(loader.dataset) // 100)] for batch in range(1, total + 1)]
    assert console.eval_updates == per_epoch * 2
    assert console.step_reports == [steps, 2 * steps] == [epoch["step"] for epoch in results.epochs]  # each epoch's last step


def test_a_max_steps_run_counts_the_epochs_and_steps_it_will_do(run_cfg, run_dir):
    console = RecordingConsole(Console(file=io.StringIO(), width=200))
    Trainer(run_cfg(*DIGITS, "trainer.epochs=5", "trainer.max_steps=3"), run_dir, [console]).fit()
    assert console.train_updates == [("epoch 1/1", 1, 3), ("epoch 1/1", 2, 3), ("epoch 1/1", 3, 3)]


def test_epoch_lines_are_logged_and_the_summary_names_run_dir_and_best_checkpoint(run_cfg, run_dir, caplog):
    output = io.StringIO()
    with caplog.at_level(logging.INFO, logger="approxtrain"):
        Trainer(run_cfg(*DIGITS, "trainer.epochs=2"), run_dir, [ConsoleCallback(Console(file=output, width=300))]).fit()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("training mlp on digits with sampler=topk ratio=0.5 on cpu: 2 epoch(s) of ")
    assert [line.split("  ")[0] for line in lines[1:3]] == ["epoch 1/2", "epoch 2/2"]
    best = run_dir / "checkpoints" / "best.pt"
    assert lines[3].startswith("finished: best accuracy ") and lines[3].endswith(f"; run dir {run_dir}; best checkpoint {best}")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.getvalue().splitlines() if line.count("│") == 3}
    assert (rows["run dir"], rows["best checkpoint"]) == (str(run_dir), str(best))
