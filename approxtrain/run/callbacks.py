"""The seams of a run: a :class:`Callback` receives its events, in this order::

    on_start
    -> (on_epoch_start
        -> (on_train_batch_start -> on_after_backward -> on_before_optimizer_step -> on_train_batch_end
            [-> on_step at a logging step]) per batch
        -> on_train_epoch_end -> on_eval_start -> on_eval_batch_end ... -> on_eval_end
        -> on_epoch) per epoch
    -> on_end;           any error on the way -> on_failure

Each hook gets the :class:`~approxtrain.run.trainer.Trainer` (its ``model``, ``results``,
``plan``, ``state``, ``steps_per_epoch``, ``dist``...). Two kinds of callback:

* *reporters* (``all_ranks = False``, the default: console, W&B, a user's logger) run on the
  writing process (rank 0) only;
* callbacks that take part in training (``all_ranks = True``: the ratio schedule, telemetry,
  a recurrent model's state) run on every rank, so that the ranks stay alike.

A callback with state returns it from :meth:`Callback.state_dict`; checkpoints carry it (under
:attr:`Callback.state_key`) and ``resume=`` hands it back to :meth:`Callback.load_state_dict`.
The trainer adds the callbacks its config asks for (:func:`training_callbacks`) before the
ones it is given; ``callbacks=`` (``configs/callbacks/``) adds callbacks by ``_target_``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer
    from approxtrain.schedule import RatioControl
    from approxtrain.telemetry import Probe, Telemetry


@dataclass(frozen=True)
class StepReport:
    """Training progress at a logging step (every ``trainer.log_every_n_steps`` and at an epoch's end)."""

    epoch: int
    batch: int  # batches done in this epoch
    step: int  # optimizer steps done in the run
    loss: float  # the last batch's reported loss (per example; per token for text)
    samples_per_s: float  # over the steps since the previous report
    compute_reduction: float  # measured over this epoch so far


@dataclass
class Batch:
    """The batch a training step is about to train on (``input``/``target`` on the training device)."""

    epoch: int  # 1-based
    index: int  # 0-based, in the epoch
    step: int  # 0-based, in the run: the optimizer steps done before this one
    input: Tensor
    target: Tensor
    eager: bool = False  # set by a hook that watches the forward: the step skips torch.compile (no recompiling)


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    all_ranks: bool = False  # True: runs on every rank (it changes training); False: a reporter, rank 0 only

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint (one callback per key)."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this callback to continue exactly (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (``resume=``)."""

    def on_start(self, trainer: Trainer) -> None:
        """After setup (data, model, plan, resume), before the first epoch."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based) trains (also when a resumed run continues inside it)."""

    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        """Before a training step's forward."""

    def on_after_backward(self, trainer: Trainer, batch: Batch) -> None:
        """After the backward: the ``.grad`` hold this step's gradients (under DDP, averaged over the
        ranks); before gradient clipping."""

    def on_before_optimizer_step(self, trainer: Trainer, batch: Batch) -> None:
        """After gradient clipping, before the optimizer step."""

    def on_train_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        """After every optimizer step (``batch`` batches of ``epoch`` done); nothing has been read from the
        device, so a hook must not read it either (progress bars: count, don't sync)."""

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        """At a logging step."""

    def on_train_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        """After the epoch's training steps, before its evaluation: fill the fields of ``record`` this
        callback owns (a ratio control: ``ratio``, ``layer_k``)."""

    def on_eval_start(self, trainer: Trainer) -> None:
        """Before an evaluation (the model is in eval mode)."""

    def on_eval_batch_end(self, trainer: Trainer, batch: int, total: int) -> None:
        """After ``batch`` of the ``total`` test batches of an evaluation (nothing read from the device)."""

    def on_eval_end(self, trainer: Trainer) -> None:
        """After an evaluation."""

    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        """After an epoch is evaluated, checkpointed and recorded in ``results.json``."""

    def on_end(self, trainer: Trainer) -> None:
        """After the run finished (or was interrupted) and ``results.json`` says so."""

    def on_failure(self, trainer: Trainer, message: str) -> None:
        """After the run failed with the one-line ``message`` (recorded when the run owns its dir)."""


# ---------------------------------------------------------------------------------------------- training callbacks


class RecurrentState(Callback):
    """A recurrent model carries its state across batches (``model.state``): reset at each epoch's
    start and around each evaluation (``model.reset_state()``)."""

    all_ranks = True

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        trainer.model.reset_state()

    def on_eval_start(self, trainer: Trainer) -> None:
        trainer.model.reset_state()

    def on_eval_end(self, trainer: Trainer) -> None:
        trainer.model.reset_state()


class RatioControlCallback(Callback):
    """Drives a :class:`~approxtrain.schedule.RatioControl` (``schedule=``): decides the layers' ``k``
    before every step; the epoch's record gets the ratio in effect averaged over its steps and each
    layer's ``k`` at its end."""

    all_ranks = True

    def __init__(self, control: RatioControl) -> None:
        self.control = control
        self.ratio_sum = 0.0  # the ratio in effect, summed over this epoch's steps so far
        self.batches = 0

    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        self.control.before_step(batch.epoch, batch.index, batch.step)

    def on_train_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        self.ratio_sum += self.control.ratio  # (after the step: an adaptive decision is taken in its forward)
        self.batches += 1

    def on_train_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        record.ratio, record.layer_k = self.ratio_sum / max(self.batches, 1), self.control.layer_k()
        self.ratio_sum, self.batches = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control.state_dict(), "ratio_sum": self.ratio_sum, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.control.load_state_dict(state["control"])
        self.ratio_sum, self.batches = state["ratio_sum"], state["batches"]


class TelemetryCallback(Callback):
    """Measures the sampled layers against exact products every ``trainer.telemetry_every`` steps
    (:mod:`approxtrain.telemetry`); the rows go to the run's state (``results.json``'s ``telemetry``).
    The extra exact pass starts from the recurrent state the step started from, runs eagerly and
    is not counted by the meter."""

    all_ranks = True  # every rank takes part in the exact gradient's all-reduce

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.probe: Probe | None = None
        self.carried: Any = None  # a recurrent model's state the measured batch starts from

    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if self.telemetry.due(batch.step):
            self.probe, self.carried = self.telemetry.watch(), getattr(trainer.model, "state", None)
            batch.eager = True  # a compiled model would recompile for the probe's hooks

    def on_after_backward(self, trainer: Trainer, batch: Batch) -> None:
        if self.probe is None:
            return
        model, carried = trainer.model, self.carried

        def exact_loss() -> Tensor:
            after = getattr(model, "state", None)
            if carried is not None or after is not None:
                model.state = carried
            try:
                return trainer.loss(model, batch.input, batch.target)[0]
            finally:
                if carried is not None or after is not None:
                    model.state = after

        from approxtrain.telemetry import telemetry_rows

        with trainer.meter.paused():
            rows = self.telemetry.measure(self.probe, exact_loss, step=batch.step, epoch=batch.epoch,
                                          average=trainer.dist.mean if trainer.dist.world_size > 1 else None)
        trainer.state.telemetry.extend(telemetry_rows(rows))
        self.probe = self.carried = None
