"""Sampler policies as registered classes: what a policy declares, and the registry of them.

A policy chooses which of a product's ``n`` column-row pairs it keeps, from their scores
(:func:`approxtrain.sampling.select` calls it). Each policy is one class, registered by its
``name`` with :func:`register_policy`, stating its properties on the class::

    @register_policy
    class Halves(SamplerPolicy):
        \"\"\"Every other pair, starting at a random one of the first two; scaled by 2.\"\"\"

        name = "halves"
        random = True
        needs_scores = False
        switches = ("scale",)

        def unbiased(self, replacement, scale):
            return scale

        def select(self, scores, k, config, generator):
            ...  # -> Selection(keep, scale, unique)

A sampler config names it (``configs/sampler/<name>.yaml``: ``name: halves``, and
``module: <the module defining it>`` for a policy outside approxtrain). The built-in
policies live in :mod:`approxtrain.sampling`; this module imports no torch (the config
store and the config checks read it), and loads the built-ins the first time the
registry is read.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from approxtrain.sampling import SamplingConfig, Selection

# The switches of :class:`~approxtrain.sampling.SamplingConfig` a policy may read.
SWITCHES = ("replacement", "scale")
_BUILT_INS = "approxtrain.sampling"


class SamplerPolicy:
    """A sampler policy. A subclass states, as class attributes:

    * ``name``: what configs call it (``sampler.name``, a layer rule's ``sampler``);
    * ``random``: it draws from the layer's generator (False: equal scores, equal selections);
    * ``fixed_k``: it keeps exactly ``k`` pairs (False: a random number of pairs, ``k`` on
      average: a host synchronisation per product, whose backward MACs are counted in backward);
    * ``compile_safe``: ``torch.compile`` traces its selection without a graph break;
    * ``needs_scores``: its selection reads the scores (False: only their number and device);
    * ``switches``: which of ``replacement`` and ``scale`` it reads; ``replacement=true`` is
      refused for a sampling policy that does not read it;
    * ``samples``: False for ``exact`` alone: every pair, every layer it is set on stays exact;

    and implements :meth:`select` and :meth:`unbiased`.
    """

    name: ClassVar[str]
    random: ClassVar[bool]
    fixed_k: ClassVar[bool] = True
    compile_safe: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    switches: ClassVar[tuple[str, ...]] = ()
    samples: ClassVar[bool] = True

    def unbiased(self, replacement: bool, scale: bool) -> bool:
        """Whether the sampled product's expectation is the exact product under these switches."""
        return False

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        """The pairs kept: ``scores`` (n,) non-negative, ``1 <= k < n`` (``k >= n`` keeps every pair
        without asking the policy); ``generator`` is on the scores' device, or None."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<sampler policy {self.name!r} ({type(self).__module__}.{type(self).__qualname__})>"


_POLICIES: dict[str, SamplerPolicy] = {}
_DECLARED_FLAGS = ("random", "fixed_k", "compile_safe", "needs_scores", "samples")


def _check_declaration(cls: type) -> None:
    """Reject a policy class whose declared properties cannot work, naming the bad one."""
    where = f"sampler policy class {cls.__module__}.{cls.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, SamplerPolicy)):
        raise TypeError(f"{where} is invalid; allowed: a subclass of approxtrain.policies.SamplerPolicy")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where}: name={name!r} is invalid; allowed: a Python identifier such as 'topk'")
    for flag in _DECLARED_FLAGS:
        if not isinstance(getattr(cls, flag, None), bool):
            raise ValueError(f"{where}: {flag}={getattr(cls, flag, None)!r} is invalid; allowed: True, False")
    if not isinstance(cls.switches, tuple) or not set(cls.switches) <= set(SWITCHES):
        raise ValueError(f"{where}: switches={cls.switches!r} is invalid; allowed: a tuple of {', '.join(SWITCHES)}")
    if cls.select is SamplerPolicy.select:
        raise TypeError(f"{where} does not implement select(scores, k, config, generator)")


def register_policy(cls: type[SamplerPolicy]) -> type[SamplerPolicy]:
    """Class decorator: register ``cls`` under ``cls.name`` (one instance serves every layer).

    Raises ``TypeError``/``ValueError`` for a declaration that cannot work, or a name another
    class holds (re-registering the same class, e.g. when its module is reloaded, replaces it).
    """
    _check_declaration(cls)
    known = _POLICIES.get(cls.name)
    if known is not None and (type(known).__module__, type(known).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"sampler policy {cls.name!r} is already registered by "
                         f"{type(known).__module__}.{type(known).__qualname__}")
    _POLICIES[cls.name] = cls()
    return cls


def _registry() -> dict[str, SamplerPolicy]:
    if _BUILT_INS not in sys.modules:  # the built-ins register on import
        importlib.import_module(_BUILT_INS)
    return _POLICIES


def policy_names() -> tuple[str, ...]:
    """The registered policies' names, built-ins first, in registration order.

    Examples::

        >>> policy_names()[:5]
        ('exact', 'topk', 'nps', 'uniform', 'bernoulli')
    """
    return tuple(_registry())


def get_policy(name: Any) -> SamplerPolicy:
    """The registered policy ``name``; ``ValueError`` naming the registered ones when there is none.

    Examples::

        >>> nps = get_policy("nps")
        >>> nps.random, nps.unbiased(replacement=True, scale=True), nps.unbiased(replacement=False, scale=True)
        (True, True, False)
        >>> get_policy("halves")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: unknown sampler policy 'halves'; allowed: exact, topk, nps, uniform, bernoulli...
    """
    registry = _registry()
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown sampler policy {name!r}; allowed: {', '.join(registry)}")
    return registry[name]


def policies_reading(switch: str) -> tuple[str, ...]:
    """The registered policies that read ``switch`` (one of :data:`SWITCHES`)."""
    return tuple(name for name, policy in _registry().items() if switch in policy.switches)


def import_policy_module(module: Any) -> None:
    """Import ``module`` (a sampler config's ``module``), which registers the policies it defines."""
    if module is None:
        return
    try:
        importlib.import_module(module)
    except (ImportError, TypeError, ValueError) as error:
        raise ValueError(f"sampler.module={module!r} cannot be imported ({error}); is its folder on PYTHONPATH?") from None
