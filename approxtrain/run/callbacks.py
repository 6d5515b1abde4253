"""The seams of a run: a :class:`Callback` receives its events, in this order::

    on_start -> (on_epoch_start -> (on_train_batch_end, on_step) ... -> on_eval_batch_end ... -> on_epoch) x epochs
             -> on_end;            any error on the way -> on_failure

Reporters (console, W&B) and, later, schedules and signal handling hang off the
trainer as callbacks; the training loop itself does not know them. Each hook gets
the :class:`~approxtrain.run.trainer.Trainer`, whose ``results``, ``plan``, ``state``
and ``steps_per_epoch`` are what a reporter reads. Only the process that writes
(rank 0) calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer


@dataclass(frozen=True)
class StepReport:
    """Training progress at a logging step (every ``trainer.log_every_n_steps`` and at an epoch's end)."""

    epoch: int
    batch: int  # batches done in this epoch
    step: int  # optimizer steps done in the run
    loss: float  # the last batch's reported loss (per example; per token for text)
    samples_per_s: float  # over the steps since the previous report
    compute_reduction: float  # measured over this epoch so far


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_start(self, trainer: Trainer) -> None:
        """After setup (data, model, plan, resume), before the first epoch."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based) trains."""

    def on_train_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        """After every optimizer step (``batch`` batches of ``epoch`` done); nothing has been read from the
        device, so a hook must not read it either (progress bars: count, don't sync)."""

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        """At a logging step."""

    def on_eval_batch_end(self, trainer: Trainer, batch: int, total: int) -> None:
        """After ``batch`` of the ``total`` test batches of an evaluation (nothing read from the device)."""

    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        """After an epoch is evaluated, checkpointed and recorded in ``results.json``."""

    def on_end(self, trainer: Trainer) -> None:
        """After the run finished and ``results.json`` says so."""

    def on_failure(self, trainer: Trainer, message: str) -> None:
        """After the run failed with the one-line ``message`` (recorded when the run owns its dir)."""
