"""Optimizer and learning-rate schedule from the ``trainer.optimizer`` / ``trainer.scheduler`` config."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from approxtrain.checks import ConfigError
from approxtrain.spec import OptimizerSpec, SchedulerSpec, TrainerSpec

# What a `_target_` must be, per group: (base class, what it is called, an example, the first positional argument).
_TARGETS = {"trainer.optimizer": (torch.optim.Optimizer, "an optimizer class", "torch.optim.AdamW", "params"),
            "trainer.scheduler": (torch.optim.lr_scheduler.LRScheduler, "a learning-rate scheduler class the loop steps without a metric",
                                  "torch.optim.lr_scheduler.StepLR", "optimizer")}
# A class the loop cannot step: it wants the validation metric at each step.
_NEEDS_A_METRIC = (torch.optim.lr_scheduler.ReduceLROnPlateau,)


def build_optimizer(settings: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` with the config's hyper-parameters; or the ``_target_`` class with
    ``lr``, ``weight_decay`` (where it takes one) and ``kwargs``."""
    if settings._target_ is not None:
        return target_class(settings, "trainer.optimizer")(parameters, **optimizer_arguments(settings))
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
    if settings._target_ is not None:
        return target_class(settings, "trainer.scheduler")(optimizer, **settings.kwargs)
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


def optimizer_arguments(settings: OptimizerSpec) -> dict[str, Any]:
    """The keyword arguments of a ``_target_`` optimizer: ``lr``, ``weight_decay`` where its class takes one, ``kwargs``."""
    takes = inspect.signature(target_class(settings, "trainer.optimizer")).parameters
    return {"lr": settings.lr, **({"weight_decay": settings.weight_decay} if "weight_decay" in takes else {}), **settings.kwargs}


def target_class(settings: OptimizerSpec | SchedulerSpec, prefix: str) -> type:
    """The class ``settings._target_`` names: a ``torch.optim.Optimizer`` (``trainer.optimizer``) or a learning-rate
    scheduler the loop can step (``trainer.scheduler``); :class:`ConfigError` naming the key otherwise."""
    module_name, _, name = settings._target_.rpartition(".")
    base, kind, example, _ = _TARGETS[prefix]
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{prefix}._target_={settings._target_} is invalid ({error}); "
                          f"allowed: {kind}'s dotted path, e.g. {example}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)) or issubclass(cls, _NEEDS_A_METRIC):
        why = "it steps on a metric" if isinstance(cls, type) and issubclass(cls, _NEEDS_A_METRIC) else \
            f"not a subclass of {base.__module__}.{base.__qualname__}"
        raise ConfigError(f"{prefix}._target_={settings._target_} is invalid ({why}); allowed: {kind}, e.g. {example}")
    return cls


def check_targets(trainer: TrainerSpec) -> None:
    """Import each ``_target_`` class and check the keyword arguments it would get against its signature
    (:class:`ConfigError` naming the first one it does not take), before anything is built."""
    for prefix, settings in (("trainer.optimizer", trainer.optimizer), ("trainer.scheduler", trainer.scheduler)):
        if settings._target_ is None:
            continue
        first = _TARGETS[prefix][3]
        cls = target_class(settings, prefix)
        arguments = optimizer_arguments(settings) if prefix == "trainer.optimizer" else dict(settings.kwargs)
        try:
            inspect.signature(cls).bind(first, **arguments)
        except TypeError as error:
            takes = ", ".join(name for name in inspect.signature(cls).parameters if name not in ("self", first))
            raise ConfigError(f"{prefix}.kwargs={dict(settings.kwargs)!r} is invalid for {settings._target_} ({error}); "
                              f"allowed: its keyword arguments {takes}") from None
