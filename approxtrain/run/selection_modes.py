"""How the ranks of a data-parallel run score the pairs their layers select: the selection modes.

``trainer.distributed.selection`` names one. Each is a class registered with
:func:`register_selection_mode`, stating on it whether every rank keeps the same pairs
(``same_on_every_rank``: then only the kept slices of the gradients need all-reducing, and
``sampled_allreduce=auto`` does so) and giving each approximated layer its
:class:`~approxtrain.functional.PairScoring`. This module imports no torch at import time
(config validation reads the names); :class:`~approxtrain.run.distributed.Distributed`
attaches the scorings once, at setup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from approxtrain.functional import PairScoring


class SelectionMode:
    """A selection mode: ``name``, ``same_on_every_rank``, and :meth:`scoring`."""

    name: ClassVar[str]
    same_on_every_rank: ClassVar[bool]

    def scoring(self, reduce_input: Callable[[Tensor], Tensor], world_size: int) -> PairScoring | None:
        """The scoring one approximated layer gets (None: its own input and weight, this rank's
        batch). ``reduce_input`` maps this rank's input slice norms to the global batch's."""
        raise NotImplementedError


_MODES: dict[str, SelectionMode] = {}


def register_selection_mode(cls: type[SelectionMode]) -> type[SelectionMode]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not isinstance(cls.same_on_every_rank, bool):
        raise ValueError(f"selection mode {cls.name!r}: same_on_every_rank={cls.same_on_every_rank!r} is invalid; allowed: True, False")
    _MODES[cls.name] = cls()
    return cls


def selection_mode_names() -> tuple[str, ...]:
    return tuple(_MODES)


def get_selection_mode(name: str) -> SelectionMode:
    if name not in _MODES:
        raise ValueError(f"trainer.distributed.selection={name!r} is invalid; allowed: {', '.join(_MODES)}")
    return _MODES[name]


def _pair_scoring(**settings) -> PairScoring:
    from approxtrain.functional import PairScoring  # (torch: imported when a run attaches its layers)

    return PairScoring(**settings)


@register_selection_mode
class GlobalSelection(SelectionMode):
    """Each layer's input norms are all-reduced before it selects: every rank keeps the pairs one
    process on the global batch would (one all-reduce of ``n`` floats per layer and forward)."""

    name = "global"
    same_on_every_rank = True

    def scoring(self, reduce_input: Callable[[Tensor], Tensor], world_size: int) -> PairScoring | None:
        return _pair_scoring(reduce_input=reduce_input) if world_size > 1 else None


@register_selection_mode
class WeightsSelection(SelectionMode):
    """Pairs scored by the weights' slice norms alone: the same on every rank, no communication in
    forward (and so on one process too)."""

    name = "weights"
    same_on_every_rank = True

    def scoring(self, reduce_input: Callable[[Tensor], Tensor], world_size: int) -> PairScoring | None:
        return _pair_scoring(weights_only=True)


@register_selection_mode
class LocalSelection(SelectionMode):
    """Each rank selects on its own batch: the ranks keep different pairs."""

    name = "local"
    same_on_every_rank = False

    def scoring(self, reduce_input: Callable[[Tensor], Tensor], world_size: int) -> PairScoring | None:
        return _pair_scoring() if world_size > 1 else None
