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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRODUCTS = ("forward", "input_grad", "weight_grad")


@dataclass
class ProductMACs:
    """MACs of one layer's three products."""

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


def linear_macs(rows: int, in_features: int, out_features: int) -> int:
    """MACs of ``(rows, in) @ (in, out)``; each of the three products of a Linear costs this."""
    return rows * in_features * out_features


def conv2d_macs(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    output_size: tuple[int, int],
    groups: int = 1,
) -> int:
    """MACs of a 2-d convolution producing ``(batch, out_channels, *output_size)``.

    The input-gradient (transposed convolution) and weight-gradient products cost
    the same number of MACs as the forward one.
    """
    kh, kw = kernel_size
    oh, ow = output_size
    return batch * oh * ow * out_channels * (in_channels // groups) * kh * kw


def lstm_macs(rows: int, input_size: int, hidden_size: int) -> int:
    """MACs of one LSTM layer's gate product ``[x, h] @ W1^T``, ``W1`` of shape (4h, in + h), over ``rows`` steps."""
    return rows * 4 * hidden_size * (input_size + hidden_size)


def compute_reduction(exact: int, actual: int) -> float:
    """Share of the exact MACs saved: ``(exact - actual) / exact`` (0 when nothing was counted)."""
    return (exact - actual) / exact if exact else 0.0


class ComputeMeter:
    """Per-layer MAC totals of a model, filled by its layers as they run.

    ``entries`` maps qualified layer names to :class:`LayerCompute`. Approximate
    layers record into their own entry; :func:`approxtrain.surgery.attach_meter`
    wires entries and counting hooks for exact layers.
    """

    def __init__(self) -> None:
        self.entries: dict[str, LayerCompute] = {}

    def entry(self, name: str) -> LayerCompute:
        return self.entries.setdefault(name, LayerCompute())

    def reset(self) -> None:
        for layer in self.entries.values():
            layer.reset()

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
