"""The training run: config -> data -> exact model -> surgery -> train -> results.

One function, :func:`train`, readable top to bottom. It takes the resolved config
as a plain mapping and a run dir, and reports progress to ``reporters`` (rich,
W&B) through :class:`Reporter`'s four calls; nothing here imports Hydra, W&B or
rich. Training is approximate; evaluation on the test/validation split is exact
(``model.eval()``), as in the paper.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from approxtrain.accounting import ComputeMeter, compute_reduction
from approxtrain.config import layer_rules
from approxtrain.data import DatasetInfo, build_loaders
from approxtrain.models import build_model, model_spec
from approxtrain.run.rundir import load_checkpoint, save_checkpoint, write_results
from approxtrain.surgery import Plan, approximate_, attach_meter


class Reporter(Protocol):
    """Receives a run's progress; implementations print (rich) or log (W&B)."""

    def on_start(self, results: dict[str, Any], plan: Plan, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float | None, samples_per_s: float, compute_reduction: float) -> None: ...

    def on_epoch(self, record: dict[str, Any], results: dict[str, Any]) -> None: ...

    def on_end(self, results: dict[str, Any]) -> None: ...


@dataclass
class _State:
    """What a checkpoint must carry to continue a run exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    exact_macs: int = 0
    actual_macs: int = 0
    wall_time_s: float = 0.0
    step_times: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_optimizer(settings: Mapping[str, Any], parameters) -> torch.optim.Optimizer:
    if settings["name"] == "adam":
        return torch.optim.Adam(parameters, lr=settings["lr"], betas=tuple(settings["betas"]),
                                eps=settings["eps"], weight_decay=settings["weight_decay"])
    return torch.optim.SGD(parameters, lr=settings["lr"], momentum=settings["momentum"],
                           nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])


def build_scheduler(settings: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``multistep``: x gamma at each milestone; ``exponential``: ``start`` intervals at the full rate, then x gamma per interval."""
    name = settings["name"]
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(settings["milestones"]), settings["gamma"])
    if name == "exponential":
        gamma, start = settings["gamma"], settings["start"]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma ** max(0, t + 1 - start))
    return None


def _loss(output: Tensor, target: Tensor, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    """(loss to optimise, per-example mean loss to report).

    Text: cross-entropy summed over the time steps and averaged over the batch, as
    Zaremba et al.'s TF model trains (lr 1 and clip 5 assume it); reported per token.
    """
    if info.kind == "text":
        per_token = F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
        return per_token * target.shape[1], per_token
    loss = F.cross_entropy(output.float(), target)
    return loss, loss


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DatasetInfo, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Exact evaluation: accuracy (fraction) for images, perplexity for text."""
    model.eval()
    reset_state = getattr(model, "reset_state", None)
    if callable(reset_state):
        reset_state()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for input, target in loader:
        input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(input)
        if info.kind == "text":
            total += F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1), reduction="sum")
        else:
            total += (output.argmax(dim=1) == target).sum()
        count += target.numel()
    if callable(reset_state):
        reset_state()
    mean = total.item() / max(count, 1)
    return math.exp(mean) if info.kind == "text" else mean


class _StepTimer:
    """Per-step wall times; CUDA events avoid a host sync on every step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.times: list[float] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        """Returns the host-side time of the step (exact on CPU)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
            return 0.0
        elapsed = time.perf_counter() - self._start
        self.times.append(elapsed)
        return elapsed

    def collect(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.times.extend(start.elapsed_time(end) / 1000 for start, end in self.events)
            self.events.clear()
        times, self.times = self.times, []
        return times


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # peak RSS of the process


def _example_input(kind: str, info: DatasetInfo, dataset: Mapping[str, Any], device: torch.device) -> Tensor:
    """A 2-example batch of the model's input ``kind``, to trace the layers' MACs."""
    if kind == "text":
        return torch.zeros(2, dataset["seq_len"], dtype=torch.long, device=device)
    return torch.zeros(2, info.in_channels, *info.image_size, device=device)


def train(cfg: Mapping[str, Any], run_dir: Path, reporters: Sequence[Reporter] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says, writing ``results.json`` and checkpoints into ``run_dir``.

    Returns the final results (the same dict ``results.json`` holds). ``cfg`` has passed
    :func:`approxtrain.config.validate` (the CLI validates it once, before anything starts).
    """
    trainer, data = cfg["trainer"], cfg["dataset"]
    run_dir = Path(run_dir)
    seed = cfg["seed"]
    seed_everything(seed, trainer["deterministic"])
    device = resolve_device(trainer["device"])
    amp_dtype = torch.bfloat16 if trainer["amp"] == "bf16" or trainer["amp"] == "auto" and device.type == "cuda" else None

    train_loader, test_loader, info = build_loaders(data, num_workers=trainer["num_workers"], seed=seed, pin_memory=device.type == "cuda")
    model = build_model(cfg["model"], info).to(device)
    channels_last = trainer["channels_last"] is True or trainer["channels_last"] == "auto" and device.type == "cuda" and info.kind == "image"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    generator = torch.Generator(device=device).manual_seed(seed)
    plan = approximate_(model, layer_rules(cfg), generator=generator,
                        example_input=_example_input(model_spec(cfg["model"]).kind, info, data, device), batch_size=data["batch_size"])
    meter = ComputeMeter()
    attach_meter(model, meter)
    optimizer = build_optimizer(trainer["optimizer"], model.parameters())
    scheduler = build_scheduler(trainer["scheduler"], optimizer)
    step_scheduler = scheduler is not None and trainer["scheduler"]["interval"] == "step"

    state = _State()
    if cfg["resume"]:
        checkpoint = load_checkpoint(Path(cfg["resume"]) / "checkpoints" / "last.pt")
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise ValueError(f"resume={cfg['resume']!r} holds a checkpoint of another model ({str(error).splitlines()[0]})") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["rng"]["sampler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        state = _State(**checkpoint["state"])

    step_model = torch.compile(model) if trainer["compile"] else model
    results: dict[str, Any] = {
        "status": "running",
        "model": cfg["model"]["name"],
        "dataset": info.name,
        "sampler": cfg["sampler"]["name"],
        "ratio": cfg["ratio"],
        "seed": seed,
        "layers_rule_set": cfg["layers"].get("name", "custom"),
        "metric_name": info.metric,
        "best_metric": state.best_metric,
        "final_metric": state.history[-1]["test_metric"] if state.history else None,
        "compute_reduction": compute_reduction(state.exact_macs, state.actual_macs) if state.exact_macs else None,
        "planned_compute_reduction": plan.compute_reduction,
        "epochs": state.history,
        "layers": plan.to_dicts(),
        "wall_time_s": state.wall_time_s,
        "step_time_s": statistics.median(state.step_times) if state.step_times else None,
        "steps": state.step,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory_bytes": None,
        "error": None,
    }
    write_results(run_dir, results)
    for reporter in reporters:
        reporter.on_start(results, plan, len(train_loader))

    higher_is_better = info.metric == "accuracy"
    max_steps = trainer["max_steps"]
    log_every = max(1, trainer["log_every_n_steps"])
    timer = _StepTimer(device)
    batch_size = data["batch_size"]
    reset_state = getattr(model, "reset_state", None)
    loader_generator = getattr(train_loader, "generator", None)
    started = time.perf_counter() - state.wall_time_s
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    while state.epoch < trainer["epochs"] and (max_steps is None or state.step < max_steps):
        epoch = state.epoch + 1
        epoch_started = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with (recorded before the scheduler steps)
        if loader_generator is not None:  # the same order per epoch, also after a resume
            loader_generator.manual_seed(seed * 1_000_003 + epoch)
        model.train()
        if callable(reset_state):
            reset_state()
        meter.reset()
        loss_sum = torch.zeros((), device=device)
        batches = 0
        for input, target in train_loader:
            timer.start()
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if channels_last and input.dim() == 4:
                input = input.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                output = step_model(input)
            loss, reported = _loss(output, target, info)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer["grad_clip"]:
                nn.utils.clip_grad_norm_(model.parameters(), trainer["grad_clip"])
            optimizer.step()
            if step_scheduler:
                scheduler.step()
            loss_sum += reported.detach()
            batches += 1
            state.step += 1
            host_time = timer.stop()
            if reporters and (state.step % log_every == 0 or batches == len(train_loader)):
                loss_value = reported.item()
                for reporter in reporters:
                    reporter.on_step(epoch, batches, loss_value, batch_size / host_time if host_time else 0.0, meter.compute_reduction)
            if max_steps is not None and state.step >= max_steps:
                break
        if scheduler is not None and not step_scheduler:
            scheduler.step()

        step_times = timer.collect()
        state.step_times.extend(step_times)
        metric = evaluate(model, test_loader, info, device, amp_dtype)
        exact, actual = meter.exact.total, meter.actual.total
        state.exact_macs += exact
        state.actual_macs += actual
        record = {
            "epoch": epoch,
            "step": state.step,
            "train_loss": loss_sum.item() / max(batches, 1),
            "test_metric": metric,
            "compute_reduction": compute_reduction(exact, actual),
            "time_s": time.perf_counter() - epoch_started,
            "step_time_s": statistics.median(step_times) if step_times else None,
            "lr": epoch_lr,
        }
        state.history.append(record)
        improved = state.best_metric is None or (metric > state.best_metric if higher_is_better else metric < state.best_metric)
        if improved:
            state.best_metric = metric
        state.epoch = epoch
        state.wall_time_s = time.perf_counter() - started
        results.update(
            best_metric=state.best_metric, final_metric=metric,
            compute_reduction=compute_reduction(state.exact_macs, state.actual_macs),
            epochs=state.history, wall_time_s=state.wall_time_s, steps=state.step,
            step_time_s=statistics.median(state.step_times) if state.step_times else None,
            peak_memory_bytes=_peak_memory(device),
        )
        if trainer["checkpoint"]:
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": {
                    "sampler": generator.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
                "state": vars(state),
                "config": dict(cfg),
            }
            save_checkpoint(run_dir / "checkpoints" / "last.pt", checkpoint)
            if improved:
                save_checkpoint(run_dir / "checkpoints" / "best.pt", checkpoint)
        write_results(run_dir, results)
        for reporter in reporters:
            reporter.on_epoch(record, results)

    results["status"] = "finished"
    write_results(run_dir, results)
    for reporter in reporters:
        reporter.on_end(results)
    return results
