"""The optimised ops under every layout and precision a training run uses:
NCHW and channels_last, fp32 and bf16 autocast -- gradients against autograd on the
explicitly sliced sub-problem, exactness at ratio 1.0, unbiasedness, zero gradients
outside the sample, and the input gradient's memory format."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from approxtrain import SamplingConfig, approx_conv2d, approx_linear, select

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PRECISIONS = ("fp32", "bf16")
TOLERANCE = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 2e-2}}


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _leaf(shape, seed: int, layout=torch.contiguous_format) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if len(shape) == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 1), (1, 2, 2)], ids=["plain", "stride2", "dilation2"])
def test_conv2d_grads_match_the_sliced_problem(precision: str, layout: str, geometry: tuple[int, int, int]) -> None:
    stride, padding, dilation = geometry
    config = SamplingConfig("topk", ratio=0.5)
    x, w = _leaf((4, 12, 9, 9), 0, LAYOUTS[layout]), _leaf((8, 12, 3, 3), 1)
    b = _leaf((8,), 2)
    grad = torch.randn(4, 8, *F.conv2d(x, w, None, stride, padding, dilation).shape[2:], generator=torch.Generator().manual_seed(3))
    with _autocast(precision):
        out = approx_conv2d(x, w, b, stride, padding, dilation, config)
    out.backward(grad.to(out.dtype))

    with torch.no_grad(), _autocast(precision):
        xs, ws = (x.to(torch.bfloat16), w.to(torch.bfloat16)) if precision == "bf16" else (x, w)
        scores = xs.float().square().sum((0, 2, 3)).sqrt() * ws.float().square().sum((0, 2, 3)).sqrt()
        keep = select(scores, config.k(12), config).keep
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with _autocast(precision):
        reference = F.conv2d(xr[:, keep], wr[:, keep], br, stride, padding, dilation)
    reference.backward(grad.to(reference.dtype))

    assert out.dtype == reference.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.testing.assert_close(out, reference, **TOLERANCE[precision])
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[precision])
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[keep] = False
    assert torch.all(x.grad[:, dropped] == 0) and torch.all(w.grad[:, dropped] == 0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_channels_last_input_gradient_keeps_channels_last(precision: str) -> None:
    x, w = _leaf((2, 8, 6, 6), 0, torch.channels_last), _leaf((4, 8, 3, 3), 1)
    with _autocast(precision):
        out = approx_conv2d(x, w, None, 1, 1, 1, SamplingConfig("topk", ratio=0.5))
    (grad_x,) = torch.autograd.grad(out.float().sum(), [x])
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", [SamplingConfig("topk", ratio=0.5), SamplingConfig("topk", ratio=0.5, bwd_ratio=0.5, wu_ratio=0.5)],
                         ids=["forward", "backward_sampled"])
def test_conv2d_grads_come_in_their_tensors_layouts(precision: str, layout: str, config: SamplingConfig) -> None:
    # the op's own gradients (seen by tensor hooks, before autograd accumulates them): a kernel
    # gradient in another layout than the weight's costs a copy into the weight's on every step
    x, w, b = _leaf((4, 8, 6, 6), 0, LAYOUTS[layout]), _leaf((4, 8, 3, 3), 1, LAYOUTS[layout]), _leaf((4,), 2)
    seen = {}
    for name, t in (("x", x), ("w", w)):
        t.register_hook(lambda g, name=name: seen.setdefault(name, g))
    with _autocast(precision):
        out = approx_conv2d(x, w, b, 1, 1, 1, config)
    out.float().sum().backward()
    assert seen["x"].is_contiguous(memory_format=LAYOUTS[layout]) and seen["w"].is_contiguous(memory_format=LAYOUTS[layout])
    assert torch.equal(b.grad, torch.full((4,), float(out[0, 0].numel() * 4)))  # d(sum)/db: every output element


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_conv2d_ratio_one_is_exact(precision: str, layout: str) -> None:
    x, w = _leaf((2, 6, 7, 7), 0, LAYOUTS[layout]), _leaf((5, 6, 3, 3), 1)
    with _autocast(precision):
        ours = approx_conv2d(x, w, None, 1, 1, 1, SamplingConfig("topk", ratio=1.0))
        exact = F.conv2d(x, w, None, 1, 1, 1)
    assert torch.equal(ours, exact)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward_sampling", "with_backward_sampling"])
def test_linear_grads_match_the_sliced_problem(precision: str, backward: bool, spread_path: str, weight_layout) -> None:
    config = SamplingConfig("topk", ratio=0.5)
    x, w, b = _leaf((3, 5, 16), 0), weight_layout(_leaf((10, 16), 1)), _leaf((10,), 2)
    grad = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(3))
    with _autocast(precision):
        out = approx_linear(x, w, b, config)
    out.backward(grad.to(out.dtype))
    with torch.no_grad():
        xs, ws = (x.to(torch.bfloat16), w.to(torch.bfloat16)) if precision == "bf16" else (x, w)
        scores = xs.reshape(-1, 16).float().norm(dim=0) * ws.float().norm(dim=0)
        keep = select(scores, config.k(16), config).keep
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with _autocast(precision):
        reference = F.linear(xr[..., keep], wr[:, keep], br)
    reference.backward(grad.to(reference.dtype))
    torch.testing.assert_close(out, reference, **TOLERANCE[precision])
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[precision])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_linear_backward_sampling_in_bf16_keeps_shapes_and_zeros(precision: str, spread_path: str, weight_layout) -> None:
    config = SamplingConfig("topk", ratio=0.5, bwd_ratio=0.5, wu_ratio=0.5)
    x, w = _leaf((8, 16), 0), weight_layout(_leaf((12, 16), 1))
    with _autocast(precision):
        out = approx_linear(x, w, None, config)
    out.float().sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert (x.grad.abs().sum(0) > 0).sum() <= 8 and (w.grad.abs().sum(0) > 0).sum() <= 8


def test_channels_last_conv_is_unbiased_with_scaled_sampling(one_thread) -> None:
    x = torch.randn(2, 10, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x * torch.linspace(0.2, 3.0, 10, dtype=torch.float64).view(1, -1, 1, 1)).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 10, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = F.conv2d(x, w, padding=1)
    config = SamplingConfig("nps", ratio=0.4, replacement=True, scale=True)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        draws = torch.stack([approx_conv2d(x, w, None, 1, 1, 1, config, generator) for _ in range(2000)])
    z = (draws.mean(0) - exact) / (draws.std(0) / draws.shape[0] ** 0.5 + 1e-12)
    assert z.abs().max() < 5.0
    # and the same draws are clearly not all equal to the exact result (the test can fail)
    assert (draws[0] - exact).abs().max() > 1e-3
