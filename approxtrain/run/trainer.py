"""The training run: config -> data -> exact model -> surgery -> train -> ``results.json``.

:class:`Trainer` is the loop -- :meth:`~Trainer.fit` -> :meth:`~Trainer.train_epoch` ->
:meth:`~Trainer.training_step`, then :meth:`~Trainer.evaluate` -- and tells its
:class:`~approxtrain.run.callbacks.Callback` list what happens; what varies (the ratio
schedule, telemetry, a recurrent model's state, reporters) hangs off it as callbacks. The
bookkeeping lives with the objects that own it: :class:`~approxtrain.run.state.TrainState`
(what a checkpoint carries), :class:`~approxtrain.run.state.RunRecord` (``results.json``),
:class:`~approxtrain.run.signals.StopRequests` (stop signals and the ranks' vote),
:class:`~approxtrain.run.distributed.Distributed` (reductions, bytes sent). It takes the
resolved config as a plain mapping (nothing here imports Hydra, W&B or rich). Training is
approximate; evaluation on the test split is exact (``model.eval()``), as in the paper. Only
the writing process (``is_main``, rank 0) writes ``results.json`` and checkpoints and calls the
reporters. Under data-parallel training each rank runs a Trainer on its shard of the data, with
the :class:`~approxtrain.run.distributed.Distributed` it is handed (:mod:`approxtrain.run.launch`).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from approxtrain.accounting import ComputeMeter, compute_reduction
from approxtrain.config import all_exact_warning, lookup, validate
from approxtrain.coverage import coverage_warning, plan_coverage, step_products
from approxtrain.data import DatasetInfo, build_loaders
from approxtrain.data.order import derived_seed, shutdown_workers
from approxtrain.models import build_model
from approxtrain.run.callbacks import Batch, Callback, RatioControlCallback, RecurrentState, StepReport, TelemetryCallback
from approxtrain.run.checkpoint import load_checkpoint, repair_best, save_checkpoint
from approxtrain.run.config_keys import flatten, model_label
from approxtrain.run.device import StepTimer, peak_memory_bytes, training_device
from approxtrain.run.distributed import Distributed
from approxtrain.run.errors import RunInterrupted, TrainingDiverged, failure_message
from approxtrain.run.optim import build_optimizer, build_scheduler, run_length
from approxtrain.run.rundir import BEST_CHECKPOINT, checkpoint_path
from approxtrain.run.schema import FINISHED, INTERRUPTED, PERPLEXITY, EpochRecord, Results, improves
from approxtrain.run.signals import StopRequests, stop_signals
from approxtrain.run.state import EpochProgress, RunRecord, TrainState, rank_rng_state, rng_state, set_rng_state
from approxtrain.schedule import build_ratio_control
from approxtrain.spec import DatasetSpec, RunSpec
from approxtrain.surgery import Plan, approximate_, attach_meter, nothing_sampled_warning
from approxtrain.telemetry import Telemetry

log = logging.getLogger("approxtrain")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def logits(output: Any) -> Tensor:
    """The tensor of class scores in a model's ``output`` (the one place a model's output is read):
    the output itself, or its ``.logits`` / ``["logits"]`` / ``[0]`` (a transformers ``ModelOutput``,
    a dict, a tuple); anything else is a ``TypeError`` naming its type."""
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    if isinstance(found, Tensor):
        return found
    raise TypeError(f"the model returned a {type(output).__name__}; allowed: a Tensor of logits, or an output holding one "
                    "as .logits, ['logits'] or [0] (a transformers ModelOutput, a dict, a tuple)")


def text_loss(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(loss to optimise, per-token loss to report): cross-entropy summed over the time steps and
    averaged over the batch, as Zaremba et al.'s TF model trains (lr 1 and clip 5 assume it)."""
    per_token = F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
    return per_token * target.shape[1], per_token


RANK_STREAM = -1  # derived_seed(seed, RANK_STREAM, rank): a rank's own torch stream (epochs, the other keys, are >= 1)


def seed_rank_stream(seed: int, dist: Distributed) -> None:
    """Under DDP, seed this rank's default torch (and CUDA) stream from ``(seed, rank)``: each rank draws
    its own dropout masks. The samplers draw from their own generator, seeded alike on every rank."""
    if dist.world_size > 1:
        torch.manual_seed(derived_seed(seed, RANK_STREAM, dist.rank))


def ratio_in_effect(cfg: Mapping[str, Any]) -> float | None:
    """The forward ratio a run trains with: 1.0 for exact training (which ignores ``ratio``), else ``ratio``."""
    return 1.0 if lookup(cfg, "sampler.name") == "exact" else cfg.get("ratio")


def example_input(info: DatasetInfo, dataset: DatasetSpec | Mapping[str, Any], device: torch.device) -> Tensor:
    """A 2-example batch of the dataset's shape, to trace the layers' MACs."""
    if info.kind == "text":
        return torch.zeros(2, dataset.get("seq_len"), dtype=torch.long, device=device)
    return torch.zeros(2, info.in_channels, *info.image_size, device=device)


def training_callbacks(spec: RunSpec, model: nn.Module, steps_per_epoch: int) -> list[Callback]:
    """The callbacks a run's config asks for, which run on every rank: a recurrent model's state,
    the ratio control (``schedule``), telemetry (``trainer.telemetry_every``)."""
    callbacks: list[Callback] = []
    if callable(getattr(model, "reset_state", None)):
        callbacks.append(RecurrentState())
    control = build_ratio_control(spec.schedule, model, ratio=spec.ratio, epochs=spec.trainer.epochs,
                                  steps_per_epoch=steps_per_epoch)
    if control is not None:
        callbacks.append(RatioControlCallback(control))
    if spec.trainer.telemetry_every:
        callbacks.append(TelemetryCallback(Telemetry(model, spec.trainer.telemetry_every)))
    return callbacks


def configured_callbacks(callbacks: Mapping[str, Any] | None) -> list[Callback]:
    """The ``callbacks`` group's callbacks (``configs/callbacks/``), each built from its ``_target_``
    (a null entry is switched off)."""
    if not callbacks:
        return []
    from hydra.utils import instantiate

    built = []
    for name, settings in callbacks.items():
        if settings is None:
            continue
        callback = instantiate(settings)
        if not isinstance(callback, Callback):
            raise ValueError(f"callbacks.{name}._target_ builds a {type(callback).__name__}; allowed: a subclass of "
                             "approxtrain.run.callbacks.Callback")
        built.append(callback)
    return built


class Trainer:
    """One training run of ``cfg`` (a resolved run config, or its checked :class:`~approxtrain.spec.RunSpec`)
    into ``run_dir``.

    ``Trainer(cfg, run_dir, callbacks).fit()`` returns the final :class:`Results`, also
    written to ``run_dir/results.json`` after every epoch. A failure is recorded there
    (``status: failed`` and a one-line ``error``) and re-raised. ``dist``: this rank of a
    data-parallel run (default: one process).
    """

    def __init__(self, cfg: Mapping[str, Any] | RunSpec, run_dir: Path | str, callbacks: Sequence[Callback] = (), *,
                 is_main: bool = True, dist: Distributed | None = None) -> None:
        # a plain mapping is checked (validate) in setup, so that a bad value is recorded as the run's failure
        self.spec: RunSpec | None = cfg if isinstance(cfg, RunSpec) else None
        cfg = cfg.config if isinstance(cfg, RunSpec) else cfg
        self.dist: Distributed | None = dist  # (one process unless given: made from trainer.distributed in setup)
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main and (dist is None or dist.is_main)
        self.callbacks = [callback for callback in callbacks if self.is_main or callback.all_ranks]
        results = Results(model=model_label(flatten(cfg.get("model") or {}, "model.")), dataset=lookup(cfg, "dataset.name"),
                          sampler=lookup(cfg, "sampler.name"), ratio=ratio_in_effect(cfg), seed=cfg.get("seed"),
                          layers_rule_set=lookup(cfg, "layers.name") or "custom")
        # a resumed run's results.json is the earlier run's until its checkpoint has been read
        self.record = RunRecord(results, self.run_dir, writes=self.is_main, owns_run_dir=not cfg.get("resume"))
        self.results = results
        self.state = TrainState()
        self.stop_requests = StopRequests()
        self.plan: Plan | None = None
        self.steps_per_epoch = 0

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Validate, seed, build data, model, plan, meter, optimizer and callbacks; restore a checkpoint for ``resume=``."""
        spec = self.spec = self.spec or validate(self.cfg)
        trainer = spec.trainer
        self.dist = self.dist or Distributed.of(trainer.distributed)
        seed_everything(spec.seed, trainer.deterministic)
        self.device = training_device(trainer.device, self.dist.world_size, self.dist.local_rank)
        use_amp = trainer.amp == "bf16" or trainer.amp == "auto" and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if use_amp else None
        self.train_loader, self.test_loader, self.info, self.val_loader = build_loaders(
            spec.dataset, num_workers=trainer.num_workers, seed=spec.seed, pin_memory=self.device.type == "cuda",
            shard=(self.dist.rank, self.dist.world_size))
        self.steps_per_epoch = len(self.train_loader)
        self._build_model()
        self.optimizer = build_optimizer(trainer.optimizer, self.model.parameters())
        self.scheduler = build_scheduler(trainer.scheduler, self.optimizer, run_length(trainer, self.steps_per_epoch))
        self.scheduler_per_step = self.scheduler is not None and trainer.scheduler.interval == "step"
        on_every_rank = training_callbacks(spec, self.model, self.steps_per_epoch)
        self.callbacks = [*on_every_rank, *self.callbacks, *(configured_callbacks(spec.config.get("callbacks")) if self.is_main else [])]
        seed_rank_stream(spec.seed, self.dist)
        if spec.resume:
            self.restore(load_checkpoint(checkpoint_path(spec.resume)))
        wrapped = self.dist.wrap(self.model, self.device)
        self.step_model = torch.compile(wrapped) if trainer.compile else wrapped
        self.timer = StepTimer(self.device)
        self._describe_run()

    def _build_model(self) -> None:
        """The exact model, made approximate by the layer rules (the plan), with its MAC meter."""
        spec, device = self.spec, self.device
        assert spec is not None
        self.model = build_model(spec.model, self.info).to(device)
        channels_last = spec.trainer.channels_last
        self.channels_last = channels_last is True or (channels_last == "auto" and device.type == "cuda" and self.info.kind == "image")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        example = example_input(self.info, spec.dataset, device)
        self.plan = approximate_(self.model, spec.rules, generator=self.generator, example_input=example, batch_size=spec.batch_size)
        products = step_products(self.model, lambda model: logits(model(example)).float().sum())
        if callable(reset_state := getattr(self.model, "reset_state", None)):
            reset_state()
        self.results.coverage = plan_coverage(self.plan, products, example.shape[0])
        sampled = any(row.policy != "exact" for row in self.plan.rows)
        if self.is_main and (warning := all_exact_warning(self.cfg, self.plan, spec.rules)
                                           or nothing_sampled_warning(self.plan, spec.rules)
                                           or sampled and coverage_warning(self.results.coverage, products, self.plan.unmetered())):
            log.warning(warning)
        self.meter = ComputeMeter()
        attach_meter(self.model, self.meter)

    def _describe_run(self) -> None:
        """What ``results.json`` says of the run before it trains: dataset, metric, plan, device, ranks."""
        results, device = self.results, self.device
        assert self.plan is not None
        results.dataset, results.metric_name = self.info.name, self.info.metric
        results.planned_compute_reduction = self.plan.compute_reduction
        results.layers = self.plan.to_dicts()
        results.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results.world_size = self.dist.world_size
        results.global_batch_size = self.spec.batch_size * self.dist.world_size
        self.record.update(self.state, self.dist.world_size)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint``: model, optimizer, scheduler, every RNG, the callbacks and the run's state."""
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise ValueError(f"resume={self.spec.resume!r} holds a checkpoint of another model "
                             f"({str(error).splitlines()[0]})") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], self.generator, self.device, self.dist.rank, self.dist.world_size)
        self.state = TrainState.from_dict(checkpoint["state"])
        if self.is_main:
            repair_best(self.spec.resume, checkpoint["state"])
        states = checkpoint.get("callbacks", _earlier_callback_states(checkpoint))
        for callback in self.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
        self.record.owns_run_dir = True

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
                    # between epochs (the epoch's checkpoint is written); a stop that comes with the last step
                    # leaves a complete run: it finishes (self.done is the same on every rank, so all skip the vote)
                    if not self.done and self.stop_requests.agreed(self.dist):
                        self._interrupt()
        except RunInterrupted:
            raise
        except Exception as error:
            self.record_failure(error)
            raise
        finally:
            for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None), getattr(self, "test_loader", None)):
                shutdown_workers(loader)
        self.record.end(FINISHED)
        self._emit("on_end")
        return self.results

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.spec.trainer.epochs or self._out_of_steps

    @property
    def _out_of_steps(self) -> bool:
        max_steps = self.spec.trainer.max_steps
        return max_steps is not None and self.state.step >= max_steps

    def train_epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch (approximate products) -- or what is left of it after a resume --, then
        evaluate it (exact); returns its record."""
        progress = self.state.progress or EpochProgress(lr=self.optimizer.param_groups[0]["lr"])
        self.state.progress = None
        started = time.perf_counter() - progress.time_s
        self._start_epoch(epoch, progress.batches)
        loss_sum = torch.tensor(progress.loss_sum, device=self.device)
        window = _SpeedWindow(self.spec.batch_size, progress.batches)
        log_every = self.spec.trainer.log_every_n_steps
        for input, target in self.train_loader:
            batch = Batch(epoch, progress.batches, self.state.step, *self.to_device(input, target))
            self._emit("on_train_batch_start", batch)
            self.timer.start()
            reported = self.training_step(batch)
            self.timer.stop()
            loss_sum += reported
            progress.batches += 1
            self.state.step += 1
            self._emit("on_train_batch_end", epoch, progress.batches)
            logging_step, last = self.state.step % log_every == 0, progress.batches == self.steps_per_epoch or self._out_of_steps
            if logging_step or last:
                self._report_step(epoch, progress.batches, reported, loss_sum, window)
            if last:
                break
            if self.stop_requests.agreed(self.dist, logging_step):  # several ranks vote at logging steps only
                self._pause(progress, loss_sum, started)
        if self.scheduler is not None and not self.scheduler_per_step:
            self.scheduler.step()
        record = self._epoch_record(epoch, progress, loss_sum)
        self._emit("on_train_epoch_end", record)
        if self.is_main:  # the validation metric chooses the best epoch; the test metric is reported
            record.val_metric = self.evaluate(self.val_loader) if self.val_loader is not None else None
            record.test_metric = self.evaluate(self.test_loader)
        record.time_s = time.perf_counter() - started
        return record

    def training_step(self, batch: Batch) -> Tensor:
        """Forward, backward and optimizer step on one batch; returns the reported loss (detached, on device)."""
        trainer = self.spec.trainer
        model = self.model if batch.eager and trainer.compile else self.step_model
        loss, reported = self.loss(model, batch.input, batch.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._emit("on_after_backward", batch)
        if trainer.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), trainer.grad_clip)
        self._emit("on_before_optimizer_step", batch)
        self.optimizer.step()
        if self.scheduler_per_step:
            self.scheduler.step()
        return reported.detach()

    def loss(self, model: nn.Module, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to optimise, loss to report) of ``model`` on the batch."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            output = logits(model(input))
        if self.info.kind == "text":
            return text_loss(output, target)
        loss = F.cross_entropy(output.float(), target)
        return loss, loss

    @torch.no_grad()
    def evaluate(self, loader: Any = None) -> float:
        """Exact evaluation on ``loader`` (default: the test split): accuracy (a fraction) for images,
        perplexity for text."""
        loader = self.test_loader if loader is None else loader
        self.model.eval()
        self._emit("on_eval_start")
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count, batches = 0, len(loader)
        for batch, (input, target) in enumerate(loader, 1):
            input, target = self.to_device(input, target)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                output = logits(self.model(input))
            if self.info.kind == "text":
                total += F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1), reduction="sum")
            else:
                total += (output.argmax(dim=1) == target).sum()
            count += target.numel()
            self._emit("on_eval_batch_end", batch, batches)
        self._emit("on_eval_end")
        mean = total.item() / max(count, 1)
        if self.info.metric != PERPLEXITY:
            return mean
        return math.exp(mean) if mean < 700 else math.inf  # a diverged model's perplexity overflows

    def end_epoch(self, record: EpochRecord) -> None:
        """Book an evaluated epoch: state, checkpoints, ``results.json``, callbacks."""
        chosen_on = record.test_metric if record.val_metric is None else record.val_metric  # what chooses the best epoch
        improved = improves(self.info.metric, chosen_on, self.state.best_metric)
        if improved:
            self.state.best_metric, self.state.best_epoch = chosen_on, record.epoch
        self.state.history.append(asdict(record))
        self.state.epoch = record.epoch
        self.state.wall_time_s = time.perf_counter() - self.started
        self.record.update(self.state, self.dist.world_size)
        self.results.peak_memory_bytes = peak_memory_bytes(self.device)
        if self.spec.trainer.checkpoint:
            self.save_checkpoint(best=improved)
        self.record.write()
        self._emit("on_epoch", record)

    # ------------------------------------------------------------------------------------------ the loop's parts

    def to_device(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """A batch from the loader on the training device (4-d images channels-last when the run asks)."""
        input, target = input.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        if self.channels_last and input.dim() == 4:
            input = input.contiguous(memory_format=torch.channels_last)
        return input, target

    def _start_epoch(self, epoch: int, start_batch: int) -> None:
        self.train_loader.set_epoch(epoch, start_batch)  # the order depends on (seed, epoch) only
        self.model.train()
        self.meter.reset()

    def _report_step(self, epoch: int, batch: int, reported: Tensor, loss_sum: Tensor, window: _SpeedWindow) -> None:
        """A logging step: the one host sync (loss values), the divergence check, the callbacks."""
        loss, total = self.dist.mean(torch.stack((reported.float(), loss_sum.float()))).tolist()
        if not (math.isfinite(loss) and math.isfinite(total)):
            raise TrainingDiverged(f"non-finite training loss ({loss}) by step {self.state.step}, epoch {epoch}: the run diverged; "
                                   "lower trainer.optimizer.lr or set trainer.grad_clip")
        self._emit("on_step", StepReport(epoch, batch, self.state.step, loss, window.samples_per_s(batch), self.meter.compute_reduction))

    def _count(self, progress: EpochProgress) -> None:
        """Move what the epoch's steps counted since the last count (MACs over the ranks, bytes sent) into ``progress``/the state."""
        exact, actual = self.dist.sum(torch.tensor([self.meter.exact.total, self.meter.actual.total], device=self.device)).tolist()
        self.meter.reset()
        progress.exact_macs += exact
        progress.actual_macs += actual
        progress.step_times += self.timer.collect()
        self.state.count_bytes(self.dist.communication())

    def _epoch_record(self, epoch: int, progress: EpochProgress, loss_sum: Tensor) -> EpochRecord:
        """The trained epoch's record (evaluation still to come); its counts go into the run's state."""
        self._count(progress)
        self.state.exact_macs += progress.exact_macs
        self.state.actual_macs += progress.actual_macs
        self.state.step_times.extend(progress.step_times)
        train_loss = self.dist.mean(loss_sum.double()).item() / max(progress.batches, 1)
        return EpochRecord(epoch=epoch, step=self.state.step, train_loss=train_loss, test_metric=math.nan,
                           compute_reduction=compute_reduction(progress.exact_macs, progress.actual_macs), time_s=progress.time_s,
                           step_time_s=statistics.median(progress.step_times) if progress.step_times else None,
                           lr=progress.lr, ratio=self.results.ratio)

    # ------------------------------------------------------------------------------------------ outputs

    def checkpoint(self, ranks_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything :meth:`restore` needs to continue exactly (``ranks_rng``: every rank's own streams)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(self.generator, self.device, ranks_rng),
            "state": asdict(self.state),
            "callbacks": {callback.state_key: state for callback in self.callbacks if (state := callback.state_dict())},
            "config": dict(self.cfg),
        }

    def save_checkpoint(self, best: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (and ``best.pt``) atomically; only the writing process does."""
        ranks_rng = self.dist.gather(rank_rng_state(self.device)) if self.dist.world_size > 1 else None  # every rank calls this
        if not self.is_main:
            return
        checkpoint = self.checkpoint(ranks_rng)
        save_checkpoint(checkpoint_path(self.run_dir), checkpoint)
        if best:  # after last.pt, which records the best epoch: a crash between is repaired on resume
            save_checkpoint(checkpoint_path(self.run_dir, BEST_CHECKPOINT), checkpoint)

    def record_failure(self, error: BaseException) -> str:
        """Record ``error`` as this run's one-line failure (in ``results.json`` once the run owns its
        dir) and tell the callbacks; returns the line. Never raises (it runs inside an ``except``)."""
        message = failure_message(error)
        self.record.results.steps = self.state.step  # the steps done before it failed, not the last epoch's
        self.record.fail(message)
        self._emit("on_failure", message)
        return message

    def _pause(self, progress: EpochProgress, loss_sum: Tensor, started: float) -> None:
        """At a step boundary inside an epoch: keep what the epoch did so far in the state, then stop."""
        progress.loss_sum = self.dist.mean(loss_sum.double()).item()  # each rank continues from the mean
        self._count(progress)
        progress.time_s = time.perf_counter() - started
        self.state.progress = progress
        self.state.wall_time_s = time.perf_counter() - self.started
        self.record.update(self.state, self.dist.world_size)
        self._interrupt()

    def _interrupt(self) -> None:
        """Checkpoint, record ``interrupted``, tell the callbacks and raise :class:`RunInterrupted`."""
        signal_number = self.stop_requests.signal_number
        if self.spec.trainer.checkpoint:
            self.save_checkpoint()
        self.record.end(INTERRUPTED, f"interrupted by {signal.Signals(signal_number).name} at step {self.state.step}")
        self._emit("on_end")
        self.stop_requests.hand_over(signal_number)  # e.g. submitit: requeue the job (and exit)
        raise RunInterrupted(f"{self.results.error}; continue with resume={self.run_dir}", signal_number)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _earlier_callback_states(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The callback states in a checkpoint written before callbacks had their own (the ratio control's)."""
    if checkpoint.get("ratio_control") is None:
        return {}
    progress = checkpoint["state"].get("progress") or {}
    return {RatioControlCallback.__qualname__: {"control": checkpoint["ratio_control"],
                                                "ratio_sum": progress.get("ratio_sum", 0.0), "batches": progress.get("batches", 0)}}


class _SpeedWindow:
    """Samples per second over the steps since the last report (read right after a host sync)."""

    def __init__(self, batch_size: int, batches: int = 0) -> None:
        self.batch_size, self.batches, self.since = batch_size, batches, time.perf_counter()

    def samples_per_s(self, batches: int) -> float:
        now = time.perf_counter()
        rate = (batches - self.batches) * self.batch_size / max(now - self.since, 1e-9)
        self.batches, self.since = batches, now
        return rate


def train(cfg: Mapping[str, Any], run_dir: Path | str, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says into ``run_dir``; returns the final results (what ``results.json`` holds)."""
    return Trainer(cfg, run_dir, callbacks).fit().to_dict()
