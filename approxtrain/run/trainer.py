"""The training run: config -> data -> exact model -> surgery -> train -> ``results.json``.

:class:`Trainer` splits a run into parts that each fit on a screen -- :meth:`~Trainer.setup`,
:meth:`~Trainer.fit`, :meth:`~Trainer.train_epoch`, :meth:`~Trainer.evaluate`,
:meth:`~Trainer.save_checkpoint` -- and tells its :class:`~approxtrain.run.callbacks.Callback`
list what happens. It takes the resolved config as a plain mapping (nothing here imports
Hydra, W&B or rich). Training is approximate; evaluation on the test split is exact
(``model.eval()``), as in the paper. Only the writing process (``is_main``) writes
``results.json`` and checkpoints and calls the callbacks. Under data-parallel training
(:class:`~approxtrain.run.distributed.Distributed`) each rank runs a Trainer on its shard of
the data; rank 0 is the writing process, and the losses, MACs and stop requests are reduced
over the ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from approxtrain.accounting import ComputeMeter, compute_reduction
from approxtrain.config import all_exact_warning, layer_rules, lookup, validate
from approxtrain.data import DatasetInfo, build_loaders
from approxtrain.data.order import shutdown_workers
from approxtrain.models import build_model
from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.run.device import StepTimer, peak_memory_bytes, training_device
from approxtrain.run.distributed import Communication, Distributed
from approxtrain.run.errors import RunInterrupted, TrainingDiverged, failure_message
from approxtrain.run.optim import build_optimizer, build_scheduler
from approxtrain.run.rundir import BEST_CHECKPOINT, checkpoint_path, load_checkpoint, save_checkpoint, write_results
from approxtrain.run.schema import FAILED, FINISHED, INTERRUPTED, PERPLEXITY, EpochRecord, Results, improves
from approxtrain.schedule import build_ratio_control
from approxtrain.telemetry import Telemetry, telemetry_rows
from approxtrain.surgery import Plan, approximate_, attach_meter

log = logging.getLogger("approxtrain")


@dataclass
class EpochProgress:
    """An epoch stopped at a step boundary (by a signal): what its record needs from the batches done."""

    batches: int = 0
    loss_sum: float = 0.0
    exact_macs: int = 0
    actual_macs: int = 0
    time_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    lr: float = 0.0  # the rate the epoch trains with
    ratio_sum: float = 0.0  # the ratio in effect, summed over the batches done


@dataclass
class TrainState:
    """What a checkpoint must carry, beyond model/optimizer/RNG states, to continue a run exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord dicts
    best_metric: float | None = None
    exact_macs: int = 0
    actual_macs: int = 0
    wall_time_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    progress: EpochProgress | None = None  # the unfinished epoch epoch + 1, when stopped inside it
    telemetry: list[dict[str, Any]] = field(default_factory=list)  # LayerTelemetry rows (trainer.telemetry_every)
    exact_bytes: int = 0  # gradient bytes a full all-reduce would have sent (per rank)
    actual_bytes: int = 0  # gradient bytes sent (per rank)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        progress = values.get("progress")
        return cls(**{**values, "progress": EpochProgress(**progress) if progress else None})


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def text_loss(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(loss to optimise, per-token loss to report): cross-entropy summed over the time steps and
    averaged over the batch, as Zaremba et al.'s TF model trains (lr 1 and clip 5 assume it)."""
    per_token = F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
    return per_token * target.shape[1], per_token


def example_input(info: DatasetInfo, dataset: Mapping[str, Any], device: torch.device) -> Tensor:
    """A 2-example batch of the dataset's shape, to trace the layers' MACs."""
    if info.kind == "text":
        return torch.zeros(2, dataset["seq_len"], dtype=torch.long, device=device)
    return torch.zeros(2, info.in_channels, *info.image_size, device=device)


class Trainer:
    """One training run of ``cfg`` (a resolved run config) into ``run_dir``.

    ``Trainer(cfg, run_dir, callbacks).fit()`` returns the final :class:`Results`, also
    written to ``run_dir/results.json`` after every epoch. A failure is recorded there
    (``status: failed`` and a one-line ``error``) and re-raised.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path | str, callbacks: Sequence[Callback] = (), *,
                 is_main: bool = True, dist: Distributed | None = None) -> None:
        self.dist = dist or Distributed.of(cfg)
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main and self.dist.is_main
        self.callbacks = list(callbacks) if self.is_main else []
        self.results = Results(model=lookup(cfg, "model.name"), dataset=lookup(cfg, "dataset.name"),
                               sampler=lookup(cfg, "sampler.name"), ratio=cfg.get("ratio"), seed=cfg.get("seed"),
                               layers_rule_set=lookup(cfg, "layers.name") or "custom")
        self.state = TrainState()
        # a resumed run's results.json is the earlier run's until its checkpoint has been read
        self.owns_run_dir = not cfg.get("resume")
        self.plan: Plan | None = None
        self.steps_per_epoch = 0

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Validate, seed, build data, model, plan, meter and optimizer; restore a checkpoint for ``resume=``."""
        cfg = self.cfg
        validate(cfg)
        trainer, dataset = cfg["trainer"], cfg["dataset"]
        seed_everything(cfg["seed"], trainer["deterministic"])
        self.device = device = training_device(trainer["device"], self.dist.world_size, self.dist.local_rank)
        use_amp = trainer["amp"] == "bf16" or trainer["amp"] == "auto" and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if use_amp else None
        self.train_loader, self.test_loader, self.info = build_loaders(
            dataset, num_workers=trainer["num_workers"], seed=cfg["seed"], pin_memory=device.type == "cuda",
            shard=(self.dist.rank, self.dist.world_size))
        self.steps_per_epoch = len(self.train_loader)
        self.model = build_model(cfg["model"], self.info).to(device)
        self.channels_last = trainer["channels_last"] is True or (
            trainer["channels_last"] == "auto" and device.type == "cuda" and self.info.kind == "image")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.generator = torch.Generator(device=device).manual_seed(cfg["seed"])
        self.plan = approximate_(self.model, layer_rules(cfg), generator=self.generator,
                                 example_input=example_input(self.info, dataset, device), batch_size=dataset["batch_size"])
        if self.is_main and (warning := all_exact_warning(cfg, self.plan)):
            log.warning(warning)
        self.meter = ComputeMeter()
        attach_meter(self.model, self.meter)
        self.optimizer = build_optimizer(trainer["optimizer"], self.model.parameters())
        self.scheduler = build_scheduler(trainer["scheduler"], self.optimizer)
        self.scheduler_per_step = self.scheduler is not None and trainer["scheduler"]["interval"] == "step"
        self.ratio_control = build_ratio_control(cfg.get("schedule"), self.model, ratio=cfg["ratio"],
                                                 epochs=trainer["epochs"], steps_per_epoch=self.steps_per_epoch)
        self.telemetry = Telemetry(self.model, trainer["telemetry_every"]) if trainer["telemetry_every"] else None
        if cfg["resume"]:
            self.restore(load_checkpoint(checkpoint_path(cfg["resume"])))
        wrapped = self.dist.wrap(self.model, device)
        self.step_model = torch.compile(wrapped) if trainer["compile"] else wrapped
        self.timer = StepTimer(device)
        self.results.dataset, self.results.metric_name = self.info.name, self.info.metric
        self.results.planned_compute_reduction = self.plan.compute_reduction
        self.results.layers = self.plan.to_dicts()
        self.results.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.results.world_size = self.dist.world_size
        self.results.global_batch_size = dataset["batch_size"] * self.dist.world_size
        self._update_results()

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint``: model, optimizer, scheduler, every RNG and the run's state."""
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise ValueError(f"resume={self.cfg['resume']!r} holds a checkpoint of another model "
                             f"({str(error).splitlines()[0]})") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        rng = checkpoint["rng"]
        self.generator.set_state(rng["sampler"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.state = TrainState.from_dict(checkpoint["state"])
        if self.ratio_control is not None:
            self.ratio_control.load_state_dict(checkpoint.get("ratio_control") or self.ratio_control.state_dict())
        self.owns_run_dir = True

    # ------------------------------------------------------------------------------------------ the run

    def fit(self) -> Results:
        """Set up, train epoch after epoch (evaluate, checkpoint, record each), finish; on an error
        record the failure, tell the callbacks and re-raise."""
        try:
            with stop_signals() as self.stop_requests:
                self.setup()
                self._emit("on_start")
                self.started = time.perf_counter() - self.state.wall_time_s
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                while not self.done:
                    epoch = self.state.epoch + 1
                    self._emit("on_epoch_start", epoch)
                    record = self.train_epoch(epoch)
                    self.end_epoch(record)
                    self._stop_if_asked()
        except RunInterrupted:
            raise
        except Exception as error:
            self.record_failure(error)
            raise
        finally:
            for loader in (getattr(self, "train_loader", None), getattr(self, "test_loader", None)):
                shutdown_workers(loader)
        self.results.status = FINISHED
        self._write_results()
        self._emit("on_end")
        return self.results

    @property
    def done(self) -> bool:
        max_steps = self.cfg["trainer"]["max_steps"]
        return self.state.epoch >= self.cfg["trainer"]["epochs"] or max_steps is not None and self.state.step >= max_steps

    def train_epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch (approximate products) -- or what is left of it after a resume --, then
        evaluate it (exact); returns its record."""
        trainer = self.cfg["trainer"]
        progress = self.state.progress or EpochProgress(lr=self.optimizer.param_groups[0]["lr"])
        self.state.progress = None
        epoch_started = time.perf_counter() - progress.time_s
        self._start_epoch(epoch, progress.batches)
        loss_sum = torch.tensor(progress.loss_sum, device=self.device)
        window = _SpeedWindow(self.cfg["dataset"]["batch_size"], progress.batches)
        for input, target in self.train_loader:
            if self.ratio_control is not None:
                self.ratio_control.before_step(epoch, progress.batches, self.state.step)
            self.timer.start()
            reported = self.training_step(input, target, epoch)
            self.timer.stop()
            progress.ratio_sum += self.ratio_control.ratio if self.ratio_control is not None else self.cfg["ratio"]
            loss_sum += reported
            progress.batches += 1
            self.state.step += 1
            self._emit("on_train_batch_end", epoch, progress.batches)
            last = progress.batches == self.steps_per_epoch or trainer["max_steps"] is not None and self.state.step >= trainer["max_steps"]
            if self.state.step % trainer["log_every_n_steps"] == 0 or last:
                self._report_step(epoch, progress.batches, reported, loss_sum, window)
            if last:
                break
            # several ranks agree on a stop at logging steps only: the vote is a collective (and a host sync)
            logging_step = self.state.step % trainer["log_every_n_steps"] == 0
            if (self.dist.world_size == 1 or logging_step) and self.dist.any(bool(self.stop_requests)):
                self._pause(epoch, progress, loss_sum, epoch_started)
        if self.scheduler is not None and not self.scheduler_per_step:
            self.scheduler.step()
        step_times = progress.step_times + self.timer.collect()
        self.state.step_times.extend(step_times)
        exact_now, actual_now = self._metered_macs()
        exact, actual = progress.exact_macs + exact_now, progress.actual_macs + actual_now
        self.state.exact_macs += exact
        self.state.actual_macs += actual
        self._count_communication()
        train_loss = self.dist.mean(loss_sum.double()).item() / max(progress.batches, 1)
        return EpochRecord(epoch=epoch, step=self.state.step, train_loss=train_loss,
                           test_metric=self.evaluate() if self.is_main else math.nan, compute_reduction=compute_reduction(exact, actual),
                           time_s=time.perf_counter() - epoch_started,
                           step_time_s=statistics.median(step_times) if step_times else None, lr=progress.lr,
                           ratio=progress.ratio_sum / max(progress.batches, 1),
                           layer_k=self.ratio_control.layer_k() if self.ratio_control is not None else None)

    def _report_step(self, epoch: int, batch: int, reported: Tensor, loss_sum: Tensor, window: _SpeedWindow) -> None:
        """A logging step: the one host sync (loss values), the divergence check, the callbacks."""
        loss, total = self.dist.mean(torch.stack((reported.float(), loss_sum.float()))).tolist()
        if not (math.isfinite(loss) and math.isfinite(total)):
            raise TrainingDiverged(f"non-finite training loss ({loss}) by step {self.state.step}, epoch {epoch}: the run diverged; "
                                   "lower trainer.optimizer.lr or set trainer.grad_clip")
        self._emit("on_step", StepReport(epoch, batch, self.state.step, loss, window.samples_per_s(batch), self.meter.compute_reduction))

    def _start_epoch(self, epoch: int, start_batch: int) -> None:
        self.train_loader.set_epoch(epoch, start_batch)  # the order depends on (seed, epoch) only
        self.model.train()
        self._reset_model_state()
        self.meter.reset()

    def training_step(self, input: Tensor, target: Tensor, epoch: int | None = None) -> Tensor:
        """Forward, backward and optimizer step on one batch; returns the reported loss (detached, on device).
        A telemetry step also measures the layers' approximation against exact products on this batch."""
        trainer = self.cfg["trainer"]
        input, target = input.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        if self.channels_last and input.dim() == 4:
            input = input.contiguous(memory_format=torch.channels_last)
        probe = self.telemetry.watch() if self.telemetry is not None and self.telemetry.due(self.state.step) else None
        carried = getattr(self.model, "state", None)  # a recurrent model's state this batch starts from
        # a compiled model would recompile for the probe's hooks: a measured step runs eagerly
        loss, reported = self._loss(self.model if probe is not None and trainer["compile"] else self.step_model, input, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if probe is not None:
            self._measure(probe, input, target, carried, epoch)
        if trainer["grad_clip"]:
            nn.utils.clip_grad_norm_(self.model.parameters(), trainer["grad_clip"])
        self.optimizer.step()
        if self.scheduler_per_step:
            self.scheduler.step()
        return reported.detach()

    def _loss(self, model: nn.Module, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to optimise, loss to report) of ``model`` on the batch."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            output = model(input)
        if self.info.kind == "text":
            return text_loss(output, target)
        loss = F.cross_entropy(output.float(), target)
        return loss, loss

    def _measure(self, probe: Any, input: Tensor, target: Tensor, carried: Any, epoch: int | None) -> None:
        """Telemetry on this batch: the extra exact pass starts from the same recurrent state, and the
        meter does not count it."""
        assert self.telemetry is not None

        def exact_loss() -> Tensor:
            after = getattr(self.model, "state", None)
            if carried is not None or after is not None:
                self.model.state = carried
            try:
                return self._loss(self.model, input, target)[0]
            finally:
                if carried is not None or after is not None:
                    self.model.state = after

        with self.meter.paused():
            rows = self.telemetry.measure(probe, exact_loss, step=self.state.step, epoch=epoch,
                                          average=self.dist.mean if self.dist.world_size > 1 else None)
        self.state.telemetry.extend(telemetry_rows(rows))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Exact evaluation on the test split: accuracy (a fraction) for images, perplexity for text."""
        self.model.eval()
        self._reset_model_state()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count, batches = 0, len(self.test_loader)
        for batch, (input, target) in enumerate(self.test_loader, 1):
            input, target = input.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                output = self.model(input)
            if self.info.kind == "text":
                total += F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1), reduction="sum")
            else:
                total += (output.argmax(dim=1) == target).sum()
            count += target.numel()
            self._emit("on_eval_batch_end", batch, batches)
        self._reset_model_state()
        mean = total.item() / max(count, 1)
        if self.info.metric != PERPLEXITY:
            return mean
        return math.exp(mean) if mean < 700 else math.inf  # a diverged model's perplexity overflows

    def end_epoch(self, record: EpochRecord) -> None:
        """Book an evaluated epoch: state, checkpoints, ``results.json``, callbacks."""
        improved = improves(self.info.metric, record.test_metric, self.state.best_metric)
        if improved:
            self.state.best_metric = record.test_metric
        self.state.history.append(asdict(record))
        self.state.epoch = record.epoch
        self.state.wall_time_s = time.perf_counter() - self.started
        self._update_results()
        self.results.peak_memory_bytes = peak_memory_bytes(self.device)
        if self.cfg["trainer"]["checkpoint"]:
            self.save_checkpoint(best=improved)
        self._write_results()
        self._emit("on_epoch", record)

    # ------------------------------------------------------------------------------------------ outputs

    def checkpoint(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs to continue exactly."""
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"sampler": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if cuda else None,
                    "numpy": np.random.get_state(), "python": random.getstate()},
            "state": asdict(self.state),
            "ratio_control": self.ratio_control.state_dict() if self.ratio_control is not None else None,
            "config": dict(self.cfg),
        }

    def save_checkpoint(self, best: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (and ``best.pt``) atomically; only the writing process does."""
        if not self.is_main:
            return
        checkpoint = self.checkpoint()
        save_checkpoint(checkpoint_path(self.run_dir), checkpoint)
        if best:
            save_checkpoint(checkpoint_path(self.run_dir, BEST_CHECKPOINT), checkpoint)

    def record_failure(self, error: BaseException) -> str:
        """Record ``error`` as this run's one-line failure (in ``results.json`` once the run owns its
        dir) and tell the callbacks; returns the line. A ``results.json`` that cannot be written is
        said in a warning: this runs inside an ``except`` and must not raise."""
        message = failure_message(error)
        self.results.status, self.results.error = FAILED, message
        try:
            self._write_results()
        except OSError as write_error:
            log.warning("the failure could not be recorded in %s: %s", self.run_dir, write_error)
        self._emit("on_failure", message)
        return message

    def _stop_if_asked(self) -> None:
        """Between epochs: a pending stop request ends the run (the epoch's checkpoint is written)."""
        if self.dist.any(bool(self.stop_requests)):
            self._interrupt()

    def _pause(self, epoch: int, progress: EpochProgress, loss_sum: Tensor, epoch_started: float) -> None:
        """At a step boundary inside ``epoch``: keep what the epoch did so far in the state, then stop."""
        progress.loss_sum = self.dist.mean(loss_sum.double()).item()  # each rank continues from the mean
        exact_now, actual_now = self._metered_macs()
        progress.exact_macs += exact_now
        progress.actual_macs += actual_now
        self._count_communication()
        progress.time_s = time.perf_counter() - epoch_started
        progress.step_times += self.timer.collect()
        self.state.progress = progress
        self.state.wall_time_s = time.perf_counter() - self.started
        self._update_results()
        self._interrupt()

    def _interrupt(self) -> None:
        """Checkpoint, record ``interrupted``, tell the callbacks and raise :class:`RunInterrupted`."""
        signal_number = self.stop_requests.signals[0] if self.stop_requests else signal.SIGTERM  # (another rank's)
        name = signal.Signals(signal_number).name
        if self.cfg["trainer"]["checkpoint"]:
            self.save_checkpoint()
        self.results.status = INTERRUPTED
        self.results.error = f"interrupted by {name} at step {self.state.step}"
        self._write_results()
        self._emit("on_end")
        self.stop_requests.hand_over(signal_number)  # e.g. submitit: requeue the job (and exit)
        raise RunInterrupted(f"{self.results.error}; continue with resume={self.run_dir}", signal_number)

    def _update_results(self) -> None:
        state, results = self.state, self.results
        results.best_metric = state.best_metric
        results.final_metric = state.history[-1]["test_metric"] if state.history else None
        results.compute_reduction = compute_reduction(state.exact_macs, state.actual_macs) if state.exact_macs else None
        results.epochs = state.history
        results.telemetry = state.telemetry
        results.wall_time_s, results.steps = state.wall_time_s, state.step
        results.step_time_s = statistics.median(state.step_times) if state.step_times else None
        if self.dist.world_size > 1:
            results.communication = Communication(state.exact_bytes, state.actual_bytes).to_dict()

    def _metered_macs(self) -> tuple[int, int]:
        """Exact and actual MACs the meter counted since its reset, summed over the ranks."""
        exact, actual = self.dist.sum(torch.tensor([self.meter.exact.total, self.meter.actual.total], device=self.device)).tolist()
        return exact, actual

    def _count_communication(self) -> None:
        """Move the gradient bytes sent since the last count into the state (a checkpoint carries them)."""
        sent = self.dist.communication()
        self.state.exact_bytes += sent.exact_bytes
        self.state.actual_bytes += sent.actual_bytes
        sent.exact_bytes = sent.actual_bytes = 0

    def _write_results(self) -> None:
        if self.is_main and self.owns_run_dir:
            write_results(self.run_dir, self.results)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _reset_model_state(self) -> None:
        reset_state = getattr(self.model, "reset_state", None)  # recurrent models carry state across batches
        if callable(reset_state):
            reset_state()


class _SpeedWindow:
    """Samples per second over the steps since the last report (read right after a host sync)."""

    def __init__(self, batch_size: int, batches: int = 0) -> None:
        self.batch_size, self.batches, self.since = batch_size, batches, time.perf_counter()

    def samples_per_s(self, batches: int) -> float:
        now = time.perf_counter()
        rate = (batches - self.batches) * self.batch_size / max(now - self.since, 1e-9)
        self.batches, self.since = batches, now
        return rate


# The signals that stop a run at the next step boundary: Ctrl-C, what SLURM sends before it kills
# a job, and submitit's preemption warning (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise).
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


@dataclass
class StopRequests:
    """The stop signals received while a run trains (truthy once there is one), and the handlers
    they replaced: a launcher's own (submitit requeues the job on SIGUSR2) runs after the checkpoint."""

    signals: list[int] = field(default_factory=list)
    previous: dict[int, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.signals)

    def hand_over(self, signal_number: int) -> None:
        """Call the handler this signal had before the run (when it was a Python function)."""
        handler = self.previous.get(signal_number)
        if callable(handler):
            handler(signal_number, None)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequests]:
    """While inside, the :data:`STOP_SIGNALS` are noted instead of killing the process; the trainer
    stops at the next step boundary. A second SIGINT stops at once (``KeyboardInterrupt``), like a
    kill: ``results.json`` and the checkpoints keep the last completed epoch. Outside the main
    thread nothing is installed."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def note(signal_number: int, frame: Any) -> None:
        if requests and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        requests.signals.append(signal_number)

    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    requests.previous = {number: signal.signal(number, note) for number in numbers}
    try:
        yield requests
    finally:
        for number, handler in requests.previous.items():
            signal.signal(number, handler)


def train(cfg: Mapping[str, Any], run_dir: Path | str, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says into ``run_dir``; returns the final results (what ``results.json`` holds)."""
    return Trainer(cfg, run_dir, callbacks).fit().to_dict()
