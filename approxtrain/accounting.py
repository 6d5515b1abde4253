"""Compute accounting: multiply-accumulate (MAC) counts of the tensor products.

Follows the paper's definition (Adelman & Silberstein 2018, Sec. 3.3): *compute
reduction* is the share of the multiply-accumulates in the fully-connected and
convolutional layers, forward and backward, that approximation saved out of what
exact training performs. Each layer has up to three products per step:

* ``forward``: ``Y = X W^T`` (or the convolution);
* ``input_grad``: ``dX = dY W`` -- absent when the layer's input needs no gradient
  (the first layer);
* ``weight_grad``: ``dW = dY^T X`` -- absent for frozen weights.

Element-wise work (bias, activations) and the sampling itself are not counted.
A :class:`ComputeMeter` accumulates, per layer, what exact training would have
performed and what really ran, step after step (Bernoulli's ``k`` varies).

:class:`LayerShape` is the one MAC model of a Linear or Conv2d layer (and
:func:`sampled_macs` of a sampled one): the plan (:mod:`approxtrain.surgery`) counts
with it, and so do the ops, into the meter (:func:`record_call` at forward time,
:func:`record_backward_product` for what only backward knows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from approxtrain.sampling import SamplingConfig

PRODUCTS = ("forward", "input_grad", "weight_grad")


@dataclass
class ProductMACs:
    """MACs of one layer's three products.

    Examples::

        >>> macs = ProductMACs(forward=1, input_grad=2, weight_grad=3) + ProductMACs(10, 20, 30)
        >>> macs, macs.total
        (ProductMACs(forward=11, input_grad=22, weight_grad=33), 66)
    """

    forward: int = 0
    input_grad: int = 0
    weight_grad: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad

    def __add__(self, other: ProductMACs) -> ProductMACs:
        return ProductMACs(
            self.forward + other.forward,
            self.input_grad + other.input_grad,
            self.weight_grad + other.weight_grad,
        )


class LayerCompute:
    """Running MAC totals of one layer: what exact training costs and what ran.

    Eager calls add to plain ints (cheap on the hot path). Under ``torch.compile`` the
    totals go to a small CPU int64 tensor updated in place instead: compile traces that
    as state it mutates, whereas Python ints would be guarded on and force a
    recompilation every step. The readers sum both.
    """

    _CALLS = 6

    def __init__(self) -> None:
        # [exact forward, exact input_grad, exact weight_grad, actual ..., calls]
        self._eager = [0] * 7
        self._traced = torch.zeros(7, dtype=torch.int64)

    def _bump(self, index: int, value: int) -> None:
        if torch.compiler.is_compiling():
            self._traced[index] += value
        else:
            self._eager[index] += value

    def add(self, product: str, exact: int, actual: int) -> None:
        index = PRODUCTS.index(product)
        self._bump(index, exact)
        self._bump(3 + index, actual)

    def count_call(self) -> None:
        self._bump(self._CALLS, 1)

    def record(self, exact: ProductMACs, actual: ProductMACs) -> None:
        """Add one call: its products (those with exact MACs) and the call itself."""
        self.count_call()
        for index, product in enumerate(PRODUCTS):
            macs = getattr(exact, product)
            if macs:
                self._bump(index, macs)
                self._bump(3 + index, getattr(actual, product))

    def _totals(self) -> list[int]:
        return [a + b for a, b in zip(self._eager, self._traced.tolist())]

    @property
    def exact(self) -> ProductMACs:
        return ProductMACs(*self._totals()[:3])

    @property
    def actual(self) -> ProductMACs:
        return ProductMACs(*self._totals()[3:6])

    @property
    def calls(self) -> int:
        return self._totals()[self._CALLS]

    @calls.setter
    def calls(self, value: int) -> None:
        self._eager[self._CALLS] = value
        self._traced[self._CALLS] = 0

    def reset(self) -> None:
        self._eager = [0] * 7
        self._traced.zero_()


class LayerShape(NamedTuple):
    """The sizes a Linear or Conv2d layer's MACs depend on -- the one MAC model, used by
    the plan (:mod:`approxtrain.surgery`) and by the meter (:mod:`approxtrain.functional`).

    Each product sums over triples (batch element, pair, output): ``batch`` rows of a
    Linear's input (all leading dimensions) or samples of a convolution, ``pairs`` its
    input features or channels (per group), ``out`` its output features or channels;
    each triple costs ``per_triple`` MACs (a convolution's output pixels times its kernel
    pixels; 1 for a Linear). A product keeps ``k`` of the pairs, the input-gradient one
    ``k_b`` of the outputs and the weight-gradient one ``k_w`` of the batch (default: all)::

        forward      Y   = X_S W_S^T         batch * k   * out
        input_grad   dX_S = dY_B W_{B,S}     batch * k   * k_b
        weight_grad  dW_S = dY_R^T X_{R,S}   k_w   * k   * out

    Examples::

        >>> shape = LayerShape.linear(rows=50, in_features=784, out_features=500)
        >>> shape.macs()  # exact
        ProductMACs(forward=19600000, input_grad=19600000, weight_grad=19600000)
        >>> shape.macs(k=314).total, shape.macs(input_grad=False).total  # 314 of 784 pairs; a first layer
        (23550000, 39200000)
        >>> LayerShape.conv2d(64, 256, 256, kernel_size=(3, 3), output_size=(32, 32)).forward_macs()
        38654705664
    """

    batch: int
    pairs: int
    out: int
    per_triple: int = 1

    @classmethod
    def linear(cls, rows: int, in_features: int, out_features: int) -> LayerShape:
        return cls(rows, in_features, out_features)

    @classmethod
    def conv2d(cls, batch: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
               output_size: Sequence[int], groups: int = 1) -> LayerShape:
        """A convolution producing ``(batch, out_channels, *output_size)``."""
        return cls(batch, in_channels // groups, out_channels, output_size[0] * output_size[1] * kernel_size[0] * kernel_size[1])

    def forward_macs(self, k: int | None = None) -> int:
        return self.batch * (self.pairs if k is None else k) * self.out * self.per_triple

    def input_grad_macs(self, k: int | None = None, k_b: int | None = None) -> int:
        return self.batch * (self.pairs if k is None else k) * (self.out if k_b is None else k_b) * self.per_triple

    def weight_grad_macs(self, k: int | None = None, k_w: int | None = None) -> int:
        return (self.batch if k_w is None else k_w) * (self.pairs if k is None else k) * self.out * self.per_triple

    def macs(self, k: int | None = None, k_b: int | None = None, k_w: int | None = None, *,
             input_grad: bool = True, weight_grad: bool = True) -> ProductMACs:
        """The three products' MACs (a product the call does not run: 0); default: exact."""
        return ProductMACs(self.forward_macs(k), self.input_grad_macs(k, k_b) if input_grad else 0,
                           self.weight_grad_macs(k, k_w) if weight_grad else 0)


def sampled_macs(shape: LayerShape, config: SamplingConfig, k: int | None = None, *, input_grad: bool = True,
                 weight_grad: bool = True) -> tuple[ProductMACs, ProductMACs]:
    """Exact and sampled MACs of one call of a layer sampled by ``config``: forward keeps
    ``k`` pairs (default ``config.k(pairs)``; the number really kept when known), the
    backward products ``config.bwd_k(out)`` outputs and ``config.wu_k(batch)`` rows.

    Examples::

        >>> from approxtrain.sampling import SamplingConfig
        >>> config = SamplingConfig("topk", ratio=0.4, bwd_ratio=0.05, wu_ratio=0.05, bwd_min_k=10, wu_min_k=10)
        >>> exact, sampled = sampled_macs(LayerShape.linear(50, 784, 500), config)  # Table 2's MLP layer
        >>> sampled
        ProductMACs(forward=7850000, input_grad=392500, weight_grad=1570000)
        >>> round(compute_reduction(exact.total, sampled.total), 3)
        0.833
    """
    k = config.k(shape.pairs) if k is None else k
    exact = shape.macs(input_grad=input_grad, weight_grad=weight_grad)
    return exact, shape.macs(k, config.bwd_k(shape.out), config.wu_k(shape.batch), input_grad=input_grad,
                             weight_grad=weight_grad)


def counted_in_backward(config: SamplingConfig, product: str) -> bool:
    """Whether a backward product's MACs are only known in backward: one sampled by a policy
    without ``fixed_k`` (``bernoulli``) keeps a random number of pairs. Every other product's count is known at forward
    time and recorded there (no side effects inside backward, so ``torch.compile`` traces
    the ops without breaking the graph)."""
    ratio = config.input_grad_ratio if product == "input_grad" else config.weight_grad_ratio
    return not config.sampler.fixed_k and ratio < 1.0


def record_call(compute: LayerCompute, shape: LayerShape, input_grad: bool, weight_grad: bool,
                config: SamplingConfig | None = None, k: int | None = None) -> None:
    """The meter's count of one call of an op, at forward time: the exact op, or one sampled
    by ``config`` keeping ``k`` pairs. Its forward product and the backward products autograd
    will run (``input_grad``/``weight_grad`` needed, grad enabled) but those :func:`counted_in_backward`."""
    grad = torch.is_grad_enabled()
    if config is None:
        exact = shape.macs(input_grad=grad and input_grad, weight_grad=grad and weight_grad)
        compute.record(exact, exact)
        return
    compute.record(*sampled_macs(shape, config, k,
                                 input_grad=grad and input_grad and not counted_in_backward(config, "input_grad"),
                                 weight_grad=grad and weight_grad and not counted_in_backward(config, "weight_grad")))


def record_backward_product(compute: LayerCompute | None, shape: LayerShape, config: SamplingConfig, product: str,
                            k: int, kept: int) -> None:
    """The meter's count of a backward product whose number of pairs (``kept``; the forward
    kept ``k``) is only known in backward (:func:`counted_in_backward`); others: nothing."""
    if compute is None or not counted_in_backward(config, product):
        return
    if product == "input_grad":
        compute.add(product, shape.input_grad_macs(), shape.input_grad_macs(k, k_b=kept))
    else:
        compute.add(product, shape.weight_grad_macs(), shape.weight_grad_macs(k, k_w=kept))


def lstm_macs(rows: int, input_size: int, hidden_size: int) -> int:
    """MACs of one LSTM layer's gate product ``[x, h] @ W1^T``, ``W1`` of shape (4h, in + h), over ``rows`` steps.

    Examples::

        >>> lstm_macs(rows=20, input_size=650, hidden_size=650)  # one time step of the PTB LSTM's first layer
        67600000
    """
    return LayerShape.linear(rows, input_size + hidden_size, 4 * hidden_size).forward_macs()


def lstm_stack_macs(rows: int, input_size: int, hidden_size: int, num_layers: int = 1, directions: int = 1, *,
                    input_grad: bool = True, weight_grad: bool = True) -> ProductMACs:
    """MACs exact training spends in one call of a (cuDNN) LSTM stack over ``rows`` steps.

    The recurrent part always back-propagates; the first layer's input part only when
    its input needs a gradient (``input_grad``)."""
    forward = input_grad_macs = 0
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else hidden_size * directions
        forward += directions * lstm_macs(rows, in_size, hidden_size)
        input_grad_macs += directions * lstm_macs(rows, in_size if input_grad or layer > 0 else 0, hidden_size)
    return ProductMACs(forward, input_grad_macs, forward if weight_grad else 0)


def compute_reduction(exact: int, actual: int) -> float:
    """Share of the exact MACs saved: ``(exact - actual) / exact`` (0 when nothing was counted).

    Examples::

        >>> compute_reduction(exact=100, actual=40), compute_reduction(0, 0)
        (0.6, 0.0)
    """
    return (exact - actual) / exact if exact else 0.0


class ComputeMeter:
    """Per-layer MAC totals of a model, filled by its layers as they run.

    ``entries`` maps qualified layer names to :class:`LayerCompute`. Approximate
    layers record into their own entry; :func:`approxtrain.surgery.attach_meter`
    wires entries and counting hooks for exact layers.

    Examples::

        >>> meter = ComputeMeter()
        >>> meter.entry("fc").record(LayerShape.linear(50, 784, 500).macs(), LayerShape.linear(50, 784, 500).macs(k=392))
        >>> meter.exact.total, meter.actual.total, meter.compute_reduction
        (58800000, 29400000, 0.5)
        >>> meter.summary()["fc"]["actual_forward"]
        9800000
    """

    def __init__(self) -> None:
        self.entries: dict[str, LayerCompute] = {}

    def entry(self, name: str) -> LayerCompute:
        return self.entries.setdefault(name, LayerCompute())

    def reset(self) -> None:
        for layer in self.entries.values():
            layer.reset()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, what the layers record is taken back on exit (telemetry's extra exact pass is no training)."""
        saved = {name: (list(layer._eager), layer._traced.clone()) for name, layer in self.entries.items()}
        try:
            yield
        finally:
            for name, (eager, traced) in saved.items():
                self.entries[name]._eager = eager
                self.entries[name]._traced.copy_(traced)

    @property
    def exact(self) -> ProductMACs:
        return sum((layer.exact for layer in self.entries.values()), ProductMACs())

    @property
    def actual(self) -> ProductMACs:
        return sum((layer.actual for layer in self.entries.values()), ProductMACs())

    @property
    def compute_reduction(self) -> float:
        """``saved MACs / exact MACs`` over everything counted since the last reset."""
        return compute_reduction(self.exact.total, self.actual.total)

    def summary(self) -> dict[str, dict[str, int | float]]:
        """Plain-dict view: per layer, exact and actual MACs per product, and the reduction."""
        out: dict[str, dict[str, int | float]] = {}
        for name, layer in self.entries.items():
            row: dict[str, int | float] = {}
            for product in PRODUCTS:
                row[f"exact_{product}"] = getattr(layer.exact, product)
                row[f"actual_{product}"] = getattr(layer.actual, product)
            row["compute_reduction"] = compute_reduction(layer.exact.total, layer.actual.total)
            out[name] = row
        return out
