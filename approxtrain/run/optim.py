"""Optimizer and learning-rate schedule from the ``trainer.optimizer`` / ``trainer.scheduler`` config."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch

from approxtrain.spec import OptimizerSpec, SchedulerSpec, TrainerSpec


def build_optimizer(settings: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` with the config's hyper-parameters."""
    if settings.name in ("adam", "adamw"):
        adam = torch.optim.Adam if settings.name == "adam" else torch.optim.AdamW
        return adam(parameters, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
                           weight_decay=settings.weight_decay)


def build_scheduler(settings: SchedulerSpec, optimizer: torch.optim.Optimizer,
                    length: int | None = None) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``multistep``: x gamma at each milestone; ``exponential``: ``start`` intervals at the full rate, then x gamma
    per interval; ``warmup_cosine``: ``warmup_steps`` intervals rising linearly to the rate, then a cosine down to
    ``min_lr`` at the run's end (``length``: the run's intervals); ``none``: None. Stepped per epoch or per optimizer
    step (``interval``)."""
    if settings.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(settings.milestones), settings.gamma)
    if settings.name == "exponential":
        gamma, start = settings.gamma, settings.start
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma ** max(0, t + 1 - start))
    if settings.name == "warmup_cosine":
        assert length is not None, "warmup_cosine needs the run's length"
        floors = [settings.min_lr / group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, [partial(warmup_cosine, warmup=settings.warmup_steps, length=length, floor=floor) for floor in floors])
    return None


def warmup_cosine(t: int, *, warmup: int, length: int, floor: float) -> float:
    """The rate's factor after ``t`` intervals: ``(t + 1) / warmup`` while warming up, then a half cosine from 1
    to ``floor`` (min_lr / lr) over the rest of the run's ``length`` intervals."""
    if t < warmup:
        return (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, length - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def run_length(trainer: TrainerSpec, steps_per_epoch: int) -> int:
    """The run's length in its scheduler's intervals: optimizer steps (``interval: step``) or epochs, ``max_steps`` counted."""
    steps = trainer.epochs * steps_per_epoch if trainer.max_steps is None else min(trainer.max_steps, trainer.epochs * steps_per_epoch)
    return steps if trainer.scheduler.interval == "step" else math.ceil(steps / max(1, steps_per_epoch))
