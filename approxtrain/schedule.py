"""How many pairs each sampled layer keeps, over training: ratio schedules and the adaptive controller.

A layer's ``k`` is fixed between decisions (static shapes, no host synchronisation per step):
a decision replaces the layer's frozen ``sampling`` config with :func:`dataclasses.replace`.

* :class:`RatioSchedule` (``constant``, ``warmup``, ``linear``, ``cosine``, ``step``): a weight
  ``w(t)`` in [0, 1] moves every ratio of every sampled layer (``ratio``, ``bwd_ratio``,
  ``wu_ratio``) from exact (``w = 0``: ratio 1) to the layer's configured ratio (``w = 1``)::

      ratio(t) = 1 - w(t) (1 - configured ratio)

  exact for the first ``exact_first`` epochs, then annealed over ``anneal`` epochs (linearly,
  along half a cosine, or in ``stages`` equal steps), exact again for the last ``exact_last``
  epochs; re-decided every epoch or every step (``interval``).
* :class:`AdaptiveRatios`: every ``every`` steps (or epochs), each layer keeps the smallest ``k``
  whose discarded share of the score mass ``sum of dropped |A^(i)| |B_(i)| / sum of all`` on the
  current batch is at most ``budget`` (:func:`budget_k`), set exactly as ``fixed_k``.

Both are driven by :meth:`RatioControl.before_step` (the trainer calls it before every training
step; a loop of one's own can too). No Hydra, W&B or rich here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from approxtrain import functional
from approxtrain.checks import ConfigError, choice, fraction, integer, number
from approxtrain.modules import SampledLayer
from approxtrain.sampling import SamplingConfig

SCHEDULES = ("constant", "warmup", "linear", "cosine", "step", "adaptive")
INTERVALS = ("epoch", "step")


def _toward(ratio: float, weight: float) -> float:
    """``1 - weight (1 - ratio)``: 1.0 at weight 0, exactly ``ratio`` at weight 1."""
    if weight <= 0.0:
        return 1.0
    if weight >= 1.0:
        return ratio
    return 1.0 - weight * (1.0 - ratio)


def scheduled(config: SamplingConfig, weight: float) -> SamplingConfig:
    """``config`` with its three ratios moved ``weight`` of the way from exact to their configured values."""
    return replace(config, ratio=_toward(config.ratio, weight), bwd_ratio=_toward(config.bwd_ratio, weight),
                   wu_ratio=_toward(config.wu_ratio, weight))


@dataclass(frozen=True)
class RatioSchedule:
    """Where sampling stands over training, as the weight :meth:`weight` (0 exact, 1 the configured ratios).

    Args:
        name: ``constant`` (always 1 after ``exact_first``), ``warmup`` (the same; a name for runs
            with ``exact_first > 0``), ``linear``, ``cosine``, ``step`` (annealed over ``anneal``).
        exact_first: epochs trained exact at the start.
        anneal: epochs over which ``linear``/``cosine``/``step`` go from exact to the configured ratios.
        stages: ``step``: the number of equal steps of the anneal.
        exact_last: epochs trained exact at the end (counted back from the run's ``epochs``).
        interval: ``epoch`` (decided at each epoch's start) or ``step`` (before every step).
    """

    name: str = "constant"
    exact_first: int = 0
    anneal: float = 0.0
    stages: int = 2
    exact_last: int = 0
    interval: str = "epoch"

    def weight(self, epoch: int, fraction: float, epochs: int) -> float:
        """The weight for 1-based ``epoch``, ``fraction`` of its batches done (used per ``step`` only),
        in a run of ``epochs`` epochs."""
        if epoch > epochs - self.exact_last:
            return 0.0
        t = epoch - 1 + (fraction if self.interval == "step" else 0.0) - self.exact_first
        if t < 0:
            return 0.0
        x = min(t / self.anneal, 1.0) if self.anneal > 0 else 1.0
        if self.name == "linear":
            return x
        if self.name == "cosine":
            return (1.0 - math.cos(math.pi * x)) / 2.0
        if self.name == "step":
            return min(1.0, (math.floor(x * self.stages) + 1) / self.stages)
        return 1.0


def sampled_layers(model: nn.Module) -> dict[str, SampledLayer]:
    """The model's approximate layers by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SampledLayer)}


def layer_pairs(module: SampledLayer) -> int:
    """``n``, the column-row pairs of the layer's forward product (input features / channels)."""
    return module.pairs


@torch.no_grad()
def pair_scores(module: SampledLayer, input: Tensor) -> Tensor:
    """The layer's pair scores ``|A^(i)| |B_(i)|`` for ``input`` (as its forward scores them), float32 ``(n,)``."""
    weight = module.product_weight()
    if module.kind == "Linear":
        input = input.reshape(-1, weight.shape[1])
    # the layer's own scoring: under data-parallel training every process then decides the same k
    return functional.pair_scores(input, 1, weight, 1, module.scoring).float()


def _kept_mass(scores: Tensor) -> Tensor:
    """Cumulative score mass of the largest pairs, float64: entry ``j`` = mass kept by the ``j + 1`` largest."""
    return torch.sort(scores.double(), descending=True).values.cumsum(0)


def discarded_share(scores: Tensor, k: int) -> float:
    """Share of the score mass outside the ``k`` largest scores (0 when all scores are 0)."""
    kept = _kept_mass(scores)
    total = kept[-1].item()
    return 0.0 if total <= 0 else max(0.0, 1.0 - kept[min(k, kept.numel()) - 1].item() / total)


def budget_k(scores: Tensor, budget: float, min_k: int = 1, align_k: int = 1) -> int:
    """The smallest ``k`` (at least ``min_k``, a multiple of ``align_k``, at most ``n``) whose
    discarded share of the score mass is at most ``budget``."""
    kept = _kept_mass(scores)
    n, total = kept.numel(), kept[-1]
    k = int(torch.searchsorted(kept, (1.0 - budget) * total * (1 - 1e-12)).item()) + 1 if total > 0 else 1
    k = max(k, min_k)
    if align_k > 1:
        k = -(-k // align_k) * align_k
    return min(k, n)


class RatioControl:
    """The sampled layers of a model and the sampling each started with; subclasses decide ``k``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = sampled_layers(model)
        self.base = {name: module.sampling for name, module in self.layers.items()}

    def before_step(self, epoch: int, batch: int, step: int) -> None:
        """Before the training step ``step`` (0-based, in the run), batch ``batch`` (0-based) of ``epoch`` (1-based)."""
        raise NotImplementedError

    @property
    def ratio(self) -> float:
        """The forward ratio in effect now (what an epoch's record averages)."""
        raise NotImplementedError

    def layer_k(self) -> dict[str, int]:
        """Each sampled layer's forward ``k`` now."""
        return {name: module.sampling.k(layer_pairs(module)) for name, module in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (a schedule recomputes its ratios: nothing)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state``."""


class ScheduledRatios(RatioControl):
    """Applies a :class:`RatioSchedule`: sets every sampled layer's ratios when the weight changes."""

    def __init__(self, model: nn.Module, schedule: RatioSchedule, *, ratio: float, epochs: int, steps_per_epoch: int) -> None:
        super().__init__(model)
        self.schedule, self.target, self.epochs, self.steps_per_epoch = schedule, ratio, epochs, max(steps_per_epoch, 1)
        self.weight: float | None = None

    def before_step(self, epoch: int, batch: int, step: int) -> None:
        weight = self.schedule.weight(epoch, batch / self.steps_per_epoch, self.epochs)
        if weight == self.weight:
            return
        self.weight = weight
        for name, module in self.layers.items():
            module.sampling = scheduled(self.base[name], weight)

    @property
    def ratio(self) -> float:
        """The top-level ``ratio`` as the schedule moves it."""
        return _toward(self.target, 1.0 if self.weight is None else self.weight)


class AdaptiveRatios(RatioControl):
    """Each layer's ``k`` from its scores: the smallest whose discarded share is at most ``budget``.

    Re-decided on the first step and then every ``every`` steps (``interval=step``) or at the
    start of every ``every``-th epoch (``interval=epoch``), on that step's batch: a one-shot
    forward pre-hook scores the layer's input (the only host synchronisation) and sets
    ``fixed_k``; between decisions nothing runs and every ``k`` stays as it is.
    """

    def __init__(self, model: nn.Module, *, budget: float, every: int = 1, interval: str = "epoch") -> None:
        super().__init__(model)
        self.budget, self.every, self.interval = budget, every, interval
        self.decisions = 0
        self._ratio: float | None = None
        self._pending: dict[str, RemovableHandle] = {}  # the armed one-shot hooks, by layer

    def due(self, epoch: int, batch: int, step: int) -> bool:
        """Whether the step decides: the run's first, then each ``every``-th step or epoch start."""
        if self.decisions == 0:
            return True
        if self.interval == "step":
            return step % self.every == 0
        return batch == 0 and (epoch - 1) % self.every == 0

    def before_step(self, epoch: int, batch: int, step: int) -> None:
        if self._pending or not self.due(epoch, batch, step):
            return
        self.decisions += 1
        self._pending = {name: module.register_forward_pre_hook(self._decider(name)) for name, module in self.layers.items()}

    def _decider(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def decide(module: nn.Module, args: tuple) -> None:
            if module.training:
                self.decide(name, pair_scores(self.layers[name], args[0]))
                self._pending.pop(name).remove()
        return decide

    def decide(self, name: str, scores: Tensor) -> int:
        """Set layer ``name``'s ``k`` from its ``scores``; returns it."""
        base = self.base[name]
        k = budget_k(scores, self.budget, base.min_k, base.align_k)
        self.layers[name].sampling = replace(base, fixed_k=k)
        self._ratio = None
        return k

    def state_dict(self) -> dict[str, Any]:
        """The decisions taken so far and each layer's decided ``k`` (a resumed run keeps them until
        its next decision is due, as the uninterrupted run would)."""
        return {"decisions": self.decisions,
                "fixed_k": {name: module.sampling.fixed_k for name, module in self.layers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decisions = state["decisions"]
        for name, k in state["fixed_k"].items():
            self.layers[name].sampling = replace(self.base[name], fixed_k=k)
        self._ratio = None

    @property
    def ratio(self) -> float:
        """The share of pairs the sampled layers keep: ``sum k / sum n`` (kept until the next decision)."""
        if self._ratio is None:
            n = sum(layer_pairs(module) for module in self.layers.values())
            self._ratio = sum(self.layer_k().values()) / n if n else 1.0
        return self._ratio


_SCHEDULE_KEYS = tuple(f.name for f in fields(RatioSchedule))
_ADAPTIVE_KEYS = ("name", "budget", "every", "interval")
# What each field of a schedule may be (configs/schedule/<name>.yaml; the fields RatioSchedule and AdaptiveRatios take).
FIELD_CHECKS = {
    "name": choice(*SCHEDULES),
    "exact_first": integer(0),
    "anneal": number(0, inclusive=True),
    "stages": integer(1),
    "exact_last": integer(0),
    "interval": choice(*INTERVALS),
    "budget": fraction("a number in [0, 1), e.g. 0.1"),
    "every": integer(1),
}


def schedule_fields(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's ``schedule`` config (None: constant) as a plain dict with its ``name``, every value checked;
    an unknown schedule, a field it does not take or a bad value is a
    :class:`~approxtrain.checks.ConfigError` naming it."""
    values = {"name": "constant", **(schedule or {})}
    name = values["name"]
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    allowed = _ADAPTIVE_KEYS if name == "adaptive" else _SCHEDULE_KEYS
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"schedule.{unknown[0]} is not a field of schedule={name}; allowed: {', '.join(allowed)}")
    if name == "adaptive" and "budget" not in values:
        raise ConfigError(f"schedule.budget is missing for schedule=adaptive; allowed: {FIELD_CHECKS['budget'].allowed}")
    return {key: FIELD_CHECKS[key](f"schedule.{key}", value) for key, value in values.items()}


def build_ratio_control(schedule: Mapping[str, Any] | None, model: nn.Module, *, ratio: float, epochs: int,
                        steps_per_epoch: int) -> RatioControl | None:
    """The control a run's ``schedule`` config asks for (None: a constant ratio, nothing to do)."""
    values = schedule_fields(schedule)
    if values["name"] == "adaptive":
        return AdaptiveRatios(model, **{key: value for key, value in values.items() if key != "name"})
    plan = RatioSchedule(**values)
    if plan.name == "constant" and plan.exact_first == 0 and plan.exact_last == 0:
        return None
    return ScheduledRatios(model, plan, ratio=ratio, epochs=epochs, steps_per_epoch=steps_per_epoch)
