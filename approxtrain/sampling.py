"""Sampler policies for column-row sampling (CRS).

A product ``A @ B`` with inner dimension ``n`` is approximated by keeping ``k`` of
its ``n`` column-row pairs (Adelman & Silberstein 2018, Eq. 1)::

    A @ B  ~=  sum_t  scale_t * A[:, keep_t] (outer) B[keep_t, :]

A policy maps the pairs' *scores* ``|A^(i)| * |B_(i)|`` to a :class:`Selection`
(``keep`` indices and optional ``scale`` factors). Each is a class registered with
:func:`~approxtrain.policies.register_policy`, its properties stated on it (random?
fixed ``k``? compile-safe? unbiased under which switches?). The built-ins:

* :class:`Exact` (``exact``): no sampling.
* :class:`TopK` (``topk``): the ``k`` pairs with the largest scores, no scaling (deterministic).
* :class:`NormProportional` (``nps``): probabilities ``p_i = s_i / sum_j s_j`` (Eq. 3 / Eq. 8).
* :class:`Uniform` (``uniform``): ``p_i = 1 / n``.
* :class:`Bernoulli` (``bernoulli``): pair ``i`` kept independently with probability
  ``q_i = min(1, k p_i)`` (capped mass redistributed so ``sum_i q_i = k``), scaled by
  ``1 / q_i``; the number kept varies around ``k``.

``nps`` and ``uniform`` take ``replacement`` and ``scale`` switches; ``scale`` applies
``1 / (k p_i)``. At ``k = n`` every policy keeps every pair once, unscaled: the exact
product (with replacement too). Which estimators are unbiased (and tested as such):
``nps``/``uniform`` with replacement and scaling, ``uniform`` without replacement with
scaling (``1/(k p_i) = n/k`` is the inverse inclusion probability) and ``bernoulli``.
``nps`` *without* replacement but *with* scaling follows the paper's formula and is
biased; ``topk`` and unscaled variants are biased by design.

No global state: random policies draw from the ``torch.Generator`` passed in (or
torch's default generator when ``None``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from approxtrain import kernels
from approxtrain.policies import SamplerPolicy, get_policy, policies_reading, policy_names, register_policy
from approxtrain.sampling_fields import SamplingFields

# How k = ratio * n becomes an integer: ``nearest`` rounds half up; ``floor`` is the
# authors' code (github adelmanm/approx: ``int(float(n) * sample_ratio)``).
K_ROUNDINGS = ("nearest", "floor")
# Which products ``ratio`` samples: ``forward`` -- the forward product (the paper's CRS;
# both backward products flow through its samples); ``backward`` -- the forward product
# is exact and the input-gradient and weight-gradient products each keep ``ratio`` of
# their pairs (the thesis's backward-only sampling).
MODES = ("forward", "backward")

# Norm-proportional probabilities are floored at this fraction of the mean
# probability: it keeps every pair possible (multinomial without replacement needs
# enough non-zero categories) and bounds the scale 1/(k p_i), while the estimator
# stays exactly unbiased because the scale uses the same floored p.
_PROBABILITY_FLOOR = 1e-6


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number in (0, 1]")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name}={value} is invalid; allowed: a number in (0, 1]")
    return value


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    return value


@dataclass(frozen=True)
class SamplingConfig(SamplingFields):
    """How one layer's products are sampled.

    Args:
        policy: a registered policy's name (:data:`POLICIES`, the built-ins); the policy
            object itself is ``config.sampler``.
        ratio: fraction of the forward product's column-row pairs kept, in (0, 1].
        min_k: the fewest pairs kept by the forward product.
        replacement: sample with replacement (policies that read it: ``nps``, ``uniform``).
        scale: apply the unbiasing scale ``1 / (k p_i)`` (``nps``, ``uniform``, ``bernoulli``).
        bwd_ratio: extra sampling of the input-gradient product over its inner
            dimension (output features / channels); 1.0 = none.
        bwd_min_k: the fewest pairs that product keeps.
        wu_ratio: extra sampling of the weight-gradient product over its inner
            dimension (batch rows; batch samples for a convolution); 1.0 = none.
        wu_min_k: the fewest pairs that product keeps.
        align_k: round every ``k`` up to a multiple of this (tensor-core friendly
            shapes); 1 = no rounding.
        fixed_k: the exact number of forward pairs kept (at most ``n``), in place of
            ``ratio``; set per layer by the adaptive controller (:mod:`approxtrain.schedule`).
        k_rounding: ``nearest`` (``ratio * n`` rounded half up) or ``floor`` (the
            authors' ``int(n * ratio)``).
        mode: ``forward`` (``ratio`` samples the forward product) or ``backward``
            (forward exact; ``ratio`` samples both backward products; ``bwd_ratio`` and
            ``wu_ratio`` stay 1).
        reselect_every: a layer's forward selection is reused for this many training
            calls before it is scored and chosen again (1 = every call, the paper's
            estimator); the pair scores are not computed on the calls that reuse it.

    Examples::

        >>> config = SamplingConfig("topk", ratio=0.4)
        >>> config.k(784), SamplingConfig("topk", ratio=0.4, k_rounding="floor").k(784)
        (314, 313)
        >>> SamplingConfig("topk", ratio=1.5)
        Traceback (most recent call last):
            ...
        ValueError: ratio=1.5 is invalid; allowed: a number in (0, 1]
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", get_policy(self.policy))  # not a field: resolved once, read per call
        object.__setattr__(self, "ratio", _check_ratio("ratio", self.ratio))
        object.__setattr__(self, "bwd_ratio", _check_ratio("bwd_ratio", self.bwd_ratio))
        object.__setattr__(self, "wu_ratio", _check_ratio("wu_ratio", self.wu_ratio))
        for name in ("min_k", "bwd_min_k", "wu_min_k", "align_k", "reselect_every"):
            _check_count(name, getattr(self, name))
        if self.fixed_k is not None:
            _check_count("fixed_k", self.fixed_k)
        for name in ("replacement", "scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: true, false")
        for name, allowed in (("k_rounding", K_ROUNDINGS), ("mode", MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {', '.join(allowed)}")
        for name in ("bwd_ratio", "wu_ratio"):
            if self.mode == "backward" and getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name):g} is invalid with mode=backward (ratio samples both "
                                 "backward products); allowed: 1.0")
        if self.replacement and self.sampler.samples and "replacement" not in self.sampler.switches:
            raise ValueError(f"replacement=true is invalid for policy {self.policy!r}; "
                             f"allowed with: {', '.join(policies_reading('replacement'))}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingConfig:
        """Build from a plain mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_random(self) -> bool:
        return self.sampler.random

    @property
    def is_exact(self) -> bool:
        """Whether the policy samples nothing (``exact``): every product of the layer is exact."""
        return not self.sampler.samples

    @property
    def input_grad_ratio(self) -> float:
        """The extra sampling ratio of the input-gradient product (1.0: none)."""
        return self.ratio if self.mode == "backward" else self.bwd_ratio

    @property
    def weight_grad_ratio(self) -> float:
        """The extra sampling ratio of the weight-gradient product (1.0: none)."""
        return self.ratio if self.mode == "backward" else self.wu_ratio

    @property
    def samples_backward(self) -> bool:
        return self.sampler.samples and (self.input_grad_ratio < 1.0 or self.weight_grad_ratio < 1.0)

    def k(self, n: int) -> int:
        """Forward pairs kept out of ``n``: ``clamp(round(ratio n), min_k, n)``, aligned (``mode=backward``: n;
        ``fixed_k``: ``min(fixed_k, n)``)."""
        if not self.sampler.samples or self.mode == "backward":
            return n
        if self.fixed_k is not None:
            return min(self.fixed_k, n)
        return num_kept(n, self.ratio, self.min_k, self.align_k, self.k_rounding)

    def bwd_k(self, n: int) -> int:
        """Pairs kept by the input-gradient product out of its ``n`` (output features)."""
        return num_kept(n, self.input_grad_ratio, self.bwd_min_k, self.align_k, self.k_rounding)

    def wu_k(self, n: int) -> int:
        """Pairs kept by the weight-gradient product out of its ``n`` (batch rows)."""
        return num_kept(n, self.weight_grad_ratio, self.wu_min_k, self.align_k, self.k_rounding)


def num_kept(n: int, ratio: float, min_k: int = 1, align_k: int = 1, rounding: str = "nearest") -> int:
    """``k = clamp(ratio * n, min_k, n)``, ``ratio * n`` rounded half up (``nearest``) or as the
    authors' code does, ``int(float(n) * ratio)`` (``floor``), then up to a multiple of ``align_k``.

    Examples::

        >>> num_kept(32, 0.3), num_kept(32, 0.3, rounding="floor")
        (10, 9)
        >>> num_kept(100, 0.5, align_k=8), num_kept(10, 0.01, min_k=3)
        (56, 3)
    """
    k = int(float(n) * ratio) if rounding == "floor" else math.floor(ratio * n + 0.5)
    k = max(min_k, k)
    if align_k > 1:
        k = -(-k // align_k) * align_k
    return min(max(k, 1), n)


class Selection(NamedTuple):
    """The pairs one product keeps.

    ``keep``: (k,) int64 indices into the inner dimension (may repeat when sampling
    with replacement). ``scale``: (k,) factors for the kept pairs, or ``None``.
    ``unique``: whether ``keep`` has no repeated index.
    """

    keep: Tensor
    scale: Tensor | None
    unique: bool


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"sampler generator is on {generator.device.type} but the layer runs on {device.type}; "
            f"allowed: a torch.Generator(device={device.type!r}) or None"
        )


def norm_probabilities(scores: Tensor) -> Tensor:
    """Norm-proportional probabilities (Eq. 3), floored so every pair stays possible.

    scores: (n,) non-negative. Returns (n,) float32 summing to 1 (uniform if all zero).

    Examples::

        >>> norm_probabilities(torch.tensor([1.0, 3.0]))
        tensor([0.2500, 0.7500])
    """
    s = scores.float()
    n = s.numel()
    mean = s.sum() / n
    # An all-zero score vector degrades to the uniform distribution.
    s = s + _PROBABILITY_FLOOR * mean + torch.finfo(torch.float32).tiny
    return s / s.sum()


def bernoulli_probabilities(scores: Tensor, k: int) -> Tensor:
    """Keep probabilities ``q_i = min(1, c p_i)`` with ``sum_i q_i = k``.

    The capped mass is redistributed: with scores sorted descending, the top ``c``
    pairs get ``q = 1`` and the rest ``(k - c) s_i / sum_{j >= c} s_j``, for the
    smallest ``c`` that keeps every ``q <= 1``. Computed without host synchronisation.

    scores: (n,) non-negative. Returns (n,) float32 in [0, 1].

    Examples::

        >>> bernoulli_probabilities(torch.tensor([8.0, 1.0, 1.0]), k=2)  # the first pair's mass is capped at 1
        tensor([1.0000, 0.5000, 0.5000])
    """
    p = norm_probabilities(scores)
    n = p.numel()
    if k >= n:
        return torch.ones_like(p)
    sorted_p, order = torch.sort(p, descending=True)
    # tail[c] = sum of sorted_p[c:]
    tail = sorted_p.flip(0).cumsum(0).flip(0)
    c = torch.arange(n, device=p.device)
    remaining = (k - c).clamp(min=0).to(p.dtype)
    fits = remaining * sorted_p <= tail * (1 + 1e-6)
    fits &= c < k
    # smallest c whose c-th largest pair fits under the cap
    first = torch.argmax(fits.to(torch.uint8))
    q_sorted = (remaining[first] * sorted_p / tail[first]).clamp(max=1.0)
    q_sorted = torch.where(c < first, torch.ones_like(q_sorted), q_sorted)
    return torch.empty_like(q_sorted).scatter_(0, order, q_sorted)


@torch.compiler.disable  # a data-dependent number of pairs: the one unavoidable graph break (and host sync)
def _bernoulli_select(scores: Tensor, k: int, scale: bool, generator: torch.Generator | None) -> Selection:
    q = bernoulli_probabilities(scores, k)
    draw = torch.rand(scores.numel(), device=scores.device, generator=generator)
    keep = torch.nonzero(draw < q).squeeze(1)
    if keep.numel() == 0:  # the empty sum, a zero product: one pair with scale 0 keeps every shape non-empty
        return Selection(torch.zeros(1, dtype=keep.dtype, device=keep.device), torch.zeros(1, device=q.device), True)
    return Selection(keep, q[keep].reciprocal() if scale else None, True)


def _every_pair(n: int, device: torch.device) -> Selection:
    return Selection(torch.arange(n, device=device), None, True)


@register_policy
class Exact(SamplerPolicy):
    """No sampling: every pair once, the exact product."""

    name = "exact"
    random = False
    needs_scores = False
    samples = False

    def unbiased(self, replacement: bool, scale: bool) -> bool:
        return True

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        return _every_pair(scores.numel(), scores.device)


@register_policy
class TopK(SamplerPolicy):
    """The ``k`` pairs with the largest scores, unscaled (deterministic, biased)."""

    name = "topk"
    random = False

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        if kernels.serves_topk(scores, k):  # the fused kernel: the same pairs, ties to the lower index
            return Selection(kernels.topk_indices(scores, k), None, True)
        # ascending indices make the gathers and scatters walk memory in order
        return Selection(torch.topk(scores, k, sorted=False).indices.sort().values, None, True)


@register_policy
class NormProportional(SamplerPolicy):
    """``k`` draws with probabilities ``p_i`` proportional to the scores (:func:`norm_probabilities`),
    scaled by ``1 / (k p_i)``; unbiased with replacement and scaling."""

    name = "nps"
    random = True
    switches = ("replacement", "scale")

    def unbiased(self, replacement: bool, scale: bool) -> bool:
        return replacement and scale

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        p = norm_probabilities(scores)
        keep = torch.multinomial(p, k, replacement=config.replacement, generator=generator)
        scale = (p[keep] * k).reciprocal() if config.scale else None
        return Selection(keep, scale, not config.replacement)


@register_policy
class Uniform(SamplerPolicy):
    """``k`` draws with probabilities ``1 / n``, scaled by ``n / k``; unbiased when scaled."""

    name = "uniform"
    random = True
    needs_scores = False
    switches = ("replacement", "scale")

    def unbiased(self, replacement: bool, scale: bool) -> bool:
        return scale

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        n, device = scores.numel(), scores.device
        if config.replacement:
            keep = torch.randint(n, (k,), device=device, generator=generator)
        else:
            keep = torch.randperm(n, device=device, generator=generator)[:k]
        scale = torch.full((k,), n / k, device=device) if config.scale else None
        return Selection(keep, scale, not config.replacement)


@register_policy
class Bernoulli(SamplerPolicy):
    """Each pair kept independently with probability :func:`bernoulli_probabilities` ``q_i``, scaled
    by ``1 / q_i``: ``k`` pairs on average (a host synchronisation and a graph break per product)."""

    name = "bernoulli"
    random = True
    fixed_k = False
    compile_safe = False
    switches = ("scale",)

    def unbiased(self, replacement: bool, scale: bool) -> bool:
        return scale

    def select(self, scores: Tensor, k: int, config: SamplingConfig, generator: torch.Generator | None) -> Selection:
        return _bernoulli_select(scores, k, config.scale, generator)


# The built-in policies, in registration order; :func:`~approxtrain.policies.policy_names` lists
# every registered one (yours too).
POLICIES = policy_names()


def select(
    scores: Tensor,
    k: int,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Selection:
    """Choose the pairs a product keeps, by ``config``'s policy.

    Args:
        scores: (n,) non-negative pair scores ``|A^(i)| * |B_(i)|``.
        k: pairs to keep, ``1 <= k <= n`` (the expected number for a policy without ``fixed_k``).
        config: the policy and its switches.
        generator: source of randomness for random policies.

    Returns:
        A :class:`Selection`: every pair once at ``k >= n``, whatever the policy. A policy
        without ``fixed_k`` (``bernoulli``) returns a data-dependent number of indices (one host
        synchronisation); the others return exactly ``k``.

    Examples::

        >>> scores = torch.tensor([0.1, 3.0, 0.5, 2.0])
        >>> select(scores, 2, SamplingConfig("topk"))
        Selection(keep=tensor([1, 3]), scale=None, unique=True)
        >>> selection = select(scores, 2, SamplingConfig("uniform"), torch.Generator().manual_seed(0))
        >>> selection.keep.numel(), selection.scale  # scaled by n / k: unbiased
        (2, tensor([2., 2.]))
    """
    n = scores.numel()
    if k >= n:  # every pair once: the exact product, whatever the policy
        return _every_pair(n, scores.device)
    policy = config.sampler
    if policy.random:
        _check_generator(generator, scores.device)
    return policy.select(scores, k, config, generator)
