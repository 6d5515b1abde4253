"""The approximate ops' profiler ranges: recorded while a profiler runs, free when none does."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from approxtrain.functional import approx_conv2d, approx_linear
from approxtrain.profiling import GATHER_RANGE, RANGES, SCATTER_RANGE, SELECT_RANGE, range_seconds
from approxtrain.sampling import SamplingConfig

TOPK = SamplingConfig("topk", ratio=0.5)


def sampled_steps() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    approx_linear(x, torch.randn(8, 32, requires_grad=True), config=TOPK).sum().backward()
    images = torch.randn(2, 8, 6, 6, requires_grad=True)
    approx_conv2d(images, torch.randn(4, 8, 3, 3, requires_grad=True), padding=1, config=TOPK).sum().backward()


def test_ranges_are_recorded_under_a_profiler() -> None:
    seconds, wall = range_seconds(sampled_steps, torch.device("cpu"), steps=2)
    assert set(seconds) == set(RANGES)
    assert all(seconds[name] > 0 for name in (SELECT_RANGE, GATHER_RANGE, SCATTER_RANGE)) and wall > 0


class Operators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.namespace)
        return func(*args, **(kwargs or {}))


def test_no_profiler_operator_runs_without_a_profiler() -> None:
    # each range is two dispatched operators (~6 us of host time); a step opens five per sampled layer
    with Operators() as seen:
        sampled_steps()
    assert "aten" in seen.names and "profiler" not in seen.names
