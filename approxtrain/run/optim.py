"""Optimizer and learning-rate schedule from the ``trainer.optimizer`` / ``trainer.scheduler`` config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from approxtrain.spec import OptimizerSpec, SchedulerSpec


def build_optimizer(settings: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` with the config's hyper-parameters."""
    if settings.name in ("adam", "adamw"):
        adam = torch.optim.Adam if settings.name == "adam" else torch.optim.AdamW
        return adam(parameters, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
                           weight_decay=settings.weight_decay)


def build_scheduler(settings: SchedulerSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``multistep``: x gamma at each milestone; ``exponential``: ``start`` intervals at the full rate, then x gamma
    per interval; ``none``: None. Stepped per epoch or per optimizer step (``interval``)."""
    if settings.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(settings.milestones), settings.gamma)
    if settings.name == "exponential":
        gamma, start = settings.gamma, settings.start
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma ** max(0, t + 1 - start))
    return None
