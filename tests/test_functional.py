"""Approximate ops: forward unbiasedness, gradients against autograd on the explicitly
sliced sub-problem, gradcheck, memory format and autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from approxtrain.functional import approx_conv2d, approx_linear, kept_by_producer
from approxtrain.sampling import SamplingConfig, select

DOUBLE = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_scores(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x2, dim=0) * torch.linalg.vector_norm(weight, dim=0)


def conv_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(0, 2, 3)) * torch.linalg.vector_norm(weight, dim=(0, 2, 3))


def spread_columns(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Scale slice ``i`` of ``x`` along ``dim`` by ``1.5**i`` (shuffled): well separated pair scores."""
    n = x.shape[dim]
    factors = 1.5 ** torch.randperm(n, generator=gen(99)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = n
    return x * factors.view(shape)


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def scatter(full_like: torch.Tensor, dim: int, keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``full_like`` with ``values`` added at ``keep`` along ``dim``."""
    return torch.zeros_like(full_like).index_add_(dim, keep, values)


def scaled(t: torch.Tensor, scale: torch.Tensor | None, dim: int) -> torch.Tensor:
    if scale is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * scale.to(t.dtype).view(shape)


def mean_z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    draws = estimates.shape[0]
    return (estimates.mean(0) - exact) / (estimates.std(0) / math.sqrt(draws))


# --------------------------------------------------------------------------- forward unbiasedness

UNBIASED = [
    SamplingConfig("nps", ratio=0.3, replacement=True, scale=True),
    SamplingConfig("uniform", ratio=0.3, replacement=True, scale=True),
    SamplingConfig("uniform", ratio=0.3, replacement=False, scale=True),
    SamplingConfig("bernoulli", ratio=0.3),
]


@pytest.mark.parametrize("config", UNBIASED, ids=lambda c: f"{c.policy}-rep{int(c.replacement)}")
def test_approx_linear_forward_is_unbiased(config, one_thread):
    x = spread_columns(torch.randn(5, 20, generator=gen(0), dtype=DOUBLE), 1)
    weight = torch.randn(4, 20, generator=gen(1), dtype=DOUBLE)
    bias = torch.randn(4, generator=gen(2), dtype=DOUBLE)
    exact = F.linear(x, weight, bias)
    generator = gen(3)
    with torch.no_grad():
        estimates = torch.stack([approx_linear(x, weight, bias, config, generator) for _ in range(3000)])
    z = mean_z_scores(estimates, exact)
    assert z.abs().max() < 4.5, f"max |z| = {z.abs().max():.2f}"


def test_approx_linear_forward_topk_is_biased():
    x = spread_columns(torch.randn(5, 20, generator=gen(0), dtype=DOUBLE), 1)
    weight = torch.randn(4, 20, generator=gen(1), dtype=DOUBLE)
    exact = F.linear(x, weight)
    estimate = approx_linear(x, weight, None, SamplingConfig("topk", ratio=0.3))
    assert (estimate - exact).norm() / exact.norm() > 0.01


@pytest.mark.parametrize("config", [UNBIASED[0], UNBIASED[3]], ids=["nps", "bernoulli"])
def test_approx_conv2d_forward_is_unbiased(config, one_thread):
    # Proposition 1: sampling input channels with scale 1/(k p) is unbiased.
    x = spread_columns(torch.randn(2, 10, 5, 5, generator=gen(0), dtype=DOUBLE), 1)
    weight = torch.randn(3, 10, 3, 3, generator=gen(1), dtype=DOUBLE)
    exact = F.conv2d(x, weight, padding=1)
    generator = gen(3)
    with torch.no_grad():
        estimates = torch.stack([approx_conv2d(x, weight, None, 1, 1, 1, config, generator) for _ in range(2000)])
    z = mean_z_scores(estimates, exact)
    assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"  # 150 entries


# --------------------------------------------------------------------------- linear gradients

LINEAR_FORWARD_CONFIGS = [
    SamplingConfig("topk", ratio=0.4),
    SamplingConfig("nps", ratio=0.4, replacement=True),
    SamplingConfig("nps", ratio=0.4, replacement=False, scale=False),
    SamplingConfig("uniform", ratio=0.4, replacement=False),
    SamplingConfig("uniform", ratio=0.4, replacement=True),
    SamplingConfig("bernoulli", ratio=0.4),
]


def config_id(config: SamplingConfig) -> str:
    return f"{config.policy}-rep{int(config.replacement)}-scale{int(config.scale)}"


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", LINEAR_FORWARD_CONFIGS, ids=config_id)
def test_linear_gradients_equal_autograd_of_the_sliced_problem(config, with_bias, spread_path, weight_layout):
    x = torch.randn(3, 4, 10, generator=gen(0), dtype=DOUBLE)  # leading dims are folded into rows
    weight = torch.randn(6, 10, generator=gen(1), dtype=DOUBLE)
    bias = torch.randn(6, generator=gen(2), dtype=DOUBLE) if with_bias else None
    grad_out = torch.randn(3, 4, 6, generator=gen(3), dtype=DOUBLE)

    x_a, w_a, b_a = leaves(x, weight, bias)
    w_a = weight_layout(w_a)
    y = approx_linear(x_a, w_a, b_a, config, gen(7))
    y.backward(grad_out)
    assert w_a.grad.stride() == w_a.stride()  # the gradient comes in the weight's layout

    # the reference: the same selection, drawn again from an identically seeded generator
    selection = select(linear_scores(x.reshape(-1, 10), weight), config.k(10), config, gen(7))
    if config.policy != "bernoulli":
        assert selection.keep.numel() == 4
    x_r, w_r, b_r = leaves(x, weight, bias)
    w_k = scaled(w_r[:, selection.keep], selection.scale, 1)
    y_ref = x_r[..., selection.keep] @ w_k.t()
    if b_r is not None:
        y_ref = y_ref + b_r
    y_ref.backward(grad_out)

    assert y.shape == (3, 4, 6)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x_a.grad, x_r.grad)
    torch.testing.assert_close(w_a.grad, w_r.grad)
    if with_bias:
        torch.testing.assert_close(b_a.grad, b_r.grad)
    # nothing flows outside the sampled features / weight columns
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[selection.keep] = False
    assert dropped.any()
    assert torch.all(x_a.grad[..., dropped] == 0) and torch.all(w_a.grad[:, dropped] == 0)


def linear_backward_reference(x2, weight, bias, grad_out, config, generator=None):
    """Output and gradients of approx_linear with extra backward sampling, from sliced sub-problems.

    Selections are recomputed here in the op's order: forward pairs, then (from
    grad_out) the input-gradient pairs over output features scored
    ``|dY[:, j]| |W_k[j, :]|``, then the weight-gradient rows scored ``|dY[i]| |X_k[i]|``.
    """
    n, out = weight.shape[1], weight.shape[0]
    rows = x2.shape[0]
    selection = select(linear_scores(x2, weight), config.k(n), config, generator)
    keep = selection.keep
    x_k = x2[:, keep]
    w_k = scaled(weight[:, keep], selection.scale, 1)
    output = x_k @ w_k.t() + (bias if bias is not None else 0)

    grad_x = grad_w = None
    if config.bwd_k(out) < out:
        bwd = select(torch.linalg.vector_norm(grad_out, dim=0) * torch.linalg.vector_norm(w_k, dim=1),
                     config.bwd_k(out), config, generator)
        x_leaf = x_k.detach().clone().requires_grad_()
        (grad_x_k,) = torch.autograd.grad(x_leaf @ w_k[bwd.keep].t(), x_leaf, scaled(grad_out[:, bwd.keep], bwd.scale, 1))
        grad_x = scatter(x2, 1, keep, grad_x_k)
        bwd_keep = bwd.keep
    else:
        bwd_keep = None
    if config.wu_k(rows) < rows:
        wu = select(torch.linalg.vector_norm(grad_out, dim=1) * torch.linalg.vector_norm(x_k, dim=1),
                    config.wu_k(rows), config, generator)
        w_leaf = weight.detach().clone().requires_grad_()
        y = x_k[wu.keep] @ scaled(w_leaf[:, keep], selection.scale, 1).t()
        (grad_w,) = torch.autograd.grad(y, w_leaf, scaled(grad_out[wu.keep], wu.scale, 0))
        wu_keep = wu.keep
    else:
        wu_keep = None
    return output, grad_x, grad_w, keep, bwd_keep, wu_keep


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("ratios", [(0.4, 1.0), (1.0, 0.25), (0.4, 0.25)], ids=["bwd", "wu", "bwd+wu"])
def test_linear_backward_sampling_topk_matches_recomputed_selections(ratios, with_bias, spread_path, weight_layout):
    bwd_ratio, wu_ratio = ratios
    config = SamplingConfig("topk", ratio=0.5, bwd_ratio=bwd_ratio, wu_ratio=wu_ratio)
    x = spread_columns(torch.randn(12, 10, generator=gen(0), dtype=DOUBLE), 1)
    weight = torch.randn(8, 10, generator=gen(1), dtype=DOUBLE)
    bias = torch.randn(8, generator=gen(2), dtype=DOUBLE) if with_bias else None
    grad_out = spread_columns(spread_columns(torch.randn(12, 8, generator=gen(3), dtype=DOUBLE), 1), 0)

    x_a, w_a, b_a = leaves(x, weight, bias)
    w_a = weight_layout(w_a)
    y = approx_linear(x_a, w_a, b_a, config)
    y.backward(grad_out)

    output, grad_x, grad_w, keep, bwd_keep, wu_keep = linear_backward_reference(x, weight, bias, grad_out, config)
    torch.testing.assert_close(y, output)
    if grad_x is None:  # no bwd sampling: the plain sliced gradient
        grad_x = scatter(x, 1, keep, grad_out @ weight[:, keep])
    if grad_w is None:
        grad_w = scatter(weight, 1, keep, grad_out.t() @ x[:, keep])
    torch.testing.assert_close(x_a.grad, grad_x)
    torch.testing.assert_close(w_a.grad, grad_w)
    if with_bias:
        torch.testing.assert_close(b_a.grad, grad_out.sum(0))  # the bias gradient is never sampled
    if bwd_keep is not None:
        assert bwd_keep.numel() == 3  # round(0.4 * 8)
        # the sampled input gradient differs from the forward-only one
        assert not torch.allclose(x_a.grad, scatter(x, 1, keep, grad_out @ weight[:, keep]))
    if wu_keep is not None:
        assert wu_keep.numel() == 3  # round(0.25 * 12)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    assert torch.all(x_a.grad[:, dropped] == 0) and torch.all(w_a.grad[:, dropped] == 0)


@pytest.mark.parametrize("ratios", [(0.4, 1.0), (1.0, 0.25)], ids=["bwd", "wu"])
@pytest.mark.parametrize("policy", ["nps", "uniform", "bernoulli"])
def test_linear_backward_sampling_random_policies_match_reseeded_selections(policy, ratios):
    bwd_ratio, wu_ratio = ratios
    replacement = policy == "nps"
    config = SamplingConfig(policy, ratio=0.5, replacement=replacement, bwd_ratio=bwd_ratio, wu_ratio=wu_ratio)
    x = torch.randn(12, 10, generator=gen(0), dtype=DOUBLE)
    weight = torch.randn(8, 10, generator=gen(1), dtype=DOUBLE)
    bias = torch.randn(8, generator=gen(2), dtype=DOUBLE)
    grad_out = torch.randn(12, 8, generator=gen(3), dtype=DOUBLE)

    x_a, w_a, b_a = leaves(x, weight, bias)
    y = approx_linear(x_a, w_a, b_a, config, gen(21))
    y.backward(grad_out)

    output, grad_x, grad_w, keep, _, _ = linear_backward_reference(x, weight, bias, grad_out, config, gen(21))
    torch.testing.assert_close(y, output)
    if grad_x is not None:
        torch.testing.assert_close(x_a.grad, grad_x)
    if grad_w is not None:
        torch.testing.assert_close(w_a.grad, grad_w)


def test_linear_backward_min_k():
    config = SamplingConfig("topk", ratio=1.0, bwd_ratio=0.01, bwd_min_k=3, wu_ratio=0.01, wu_min_k=2)
    x = torch.randn(6, 5, generator=gen(0), dtype=DOUBLE, requires_grad=True)
    weight = torch.randn(7, 5, generator=gen(1), dtype=DOUBLE, requires_grad=True)
    approx_linear(x, weight, None, config).backward(torch.randn(6, 7, generator=gen(2), dtype=DOUBLE))
    _, grad_x, grad_w, _, bwd_keep, wu_keep = linear_backward_reference(
        x.detach(), weight.detach(), None, torch.randn(6, 7, generator=gen(2), dtype=DOUBLE), config)
    assert bwd_keep.numel() == 3 and wu_keep.numel() == 2
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(weight.grad, grad_w)


def test_linear_gradcheck_topk():
    # separated scores keep the top-k selection fixed under gradcheck's perturbations
    x = spread_columns(torch.randn(4, 7, generator=gen(0), dtype=DOUBLE), 1).requires_grad_()
    weight = torch.randn(3, 7, generator=gen(1), dtype=DOUBLE, requires_grad=True)
    bias = torch.randn(3, generator=gen(2), dtype=DOUBLE, requires_grad=True)
    config = SamplingConfig("topk", ratio=0.5)
    assert torch.autograd.gradcheck(lambda *args: approx_linear(*args, config=config), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: approx_linear(a, w, None, config), (x, weight))



@pytest.mark.parametrize("config", [SamplingConfig("topk", ratio=0.5), SamplingConfig("nps", ratio=0.5, replacement=True)])
def test_linear_create_graph_backward_gives_the_same_gradients(config):
    # create_graph=True runs backward with grad mode on: the gradients take the plain
    # (differentiable) path instead of the out= product, with the same values
    x = torch.randn(6, 10, generator=gen(0), dtype=DOUBLE, requires_grad=True)
    weight = torch.randn(5, 10, generator=gen(1), dtype=DOUBLE, requires_grad=True)
    grad_out = torch.randn(6, 5, generator=gen(2), dtype=DOUBLE)
    plain = torch.autograd.grad(approx_linear(x, weight, None, config, gen(3)), (x, weight), grad_out)
    graph = torch.autograd.grad(approx_linear(x, weight, None, config, gen(3)), (x, weight), grad_out, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- conv2d gradients

GEOMETRIES = [  # stride, padding, dilation
    (1, 0, 1),
    (2, 1, 1),
    (1, 1, 2),
    (2, 1, 2),
    ((2, 1), (1, 0), (1, 2)),
]
CONV_FORWARD_CONFIGS = [
    SamplingConfig("topk", ratio=0.5),
    SamplingConfig("nps", ratio=0.5, replacement=True),
    SamplingConfig("uniform", ratio=0.5, replacement=False),
    SamplingConfig("bernoulli", ratio=0.5),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("config", CONV_FORWARD_CONFIGS, ids=config_id)
def test_conv2d_gradients_equal_autograd_of_the_sliced_problem(config, geometry, with_bias):
    stride, padding, dilation = geometry
    x = torch.randn(2, 6, 9, 8, generator=gen(0), dtype=DOUBLE)
    weight = torch.randn(5, 6, 3, 3, generator=gen(1), dtype=DOUBLE)
    bias = torch.randn(5, generator=gen(2), dtype=DOUBLE) if with_bias else None

    x_a, w_a, b_a = leaves(x, weight, bias)
    y = approx_conv2d(x_a, w_a, b_a, stride, padding, dilation, config, gen(7))
    grad_out = torch.randn(y.shape, generator=gen(3), dtype=DOUBLE)
    y.backward(grad_out)

    selection = select(conv_scores(x, weight), config.k(6), config, gen(7))
    x_r, w_r, b_r = leaves(x, weight, bias)
    y_ref = F.conv2d(x_r[:, selection.keep], scaled(w_r[:, selection.keep], selection.scale, 1), b_r,
                     stride, padding, dilation)
    y_ref.backward(grad_out)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x_a.grad, x_r.grad)
    torch.testing.assert_close(w_a.grad, w_r.grad)
    if with_bias:
        torch.testing.assert_close(b_a.grad, b_r.grad)
    dropped = torch.ones(6, dtype=torch.bool)
    dropped[selection.keep] = False
    assert dropped.any()
    assert torch.all(x_a.grad[:, dropped] == 0) and torch.all(w_a.grad[:, dropped] == 0)


def conv_backward_reference(x, weight, bias, geometry, grad_out, config, generator=None):
    """approx_conv2d's output and gradients with extra backward sampling, from sliced sub-problems:
    forward channels, then input-gradient output channels scored ``|dY[:, o]|_F |K_k[o]|_F``,
    then weight-gradient batch samples scored ``|dY[b]|_F |I_k[b]|_F``."""
    stride, padding, dilation = geometry
    selection = select(conv_scores(x, weight), config.k(weight.shape[1]), config, generator)
    keep = selection.keep
    x_k = x[:, keep]
    w_k = scaled(weight[:, keep], selection.scale, 1)
    output = F.conv2d(x_k, w_k, bias, stride, padding, dilation)
    out_channels, batch = weight.shape[0], x.shape[0]

    x_leaf = x_k.detach().clone().requires_grad_()
    if config.bwd_k(out_channels) < out_channels:
        bwd = select(torch.linalg.vector_norm(grad_out, dim=(0, 2, 3)) * torch.linalg.vector_norm(w_k, dim=(1, 2, 3)),
                     config.bwd_k(out_channels), config, generator)
        (grad_x_k,) = torch.autograd.grad(F.conv2d(x_leaf, w_k[bwd.keep], None, stride, padding, dilation), x_leaf,
                                          scaled(grad_out[:, bwd.keep], bwd.scale, 1))
    else:
        (grad_x_k,) = torch.autograd.grad(F.conv2d(x_leaf, w_k, None, stride, padding, dilation), x_leaf, grad_out)
    w_leaf = weight.detach().clone().requires_grad_()
    if config.wu_k(batch) < batch:
        wu = select(torch.linalg.vector_norm(grad_out, dim=(1, 2, 3)) * torch.linalg.vector_norm(x_k, dim=(1, 2, 3)),
                    config.wu_k(batch), config, generator)
        y = F.conv2d(x_k[wu.keep], scaled(w_leaf[:, keep], selection.scale, 1), None, stride, padding, dilation)
        (grad_w,) = torch.autograd.grad(y, w_leaf, scaled(grad_out[wu.keep], wu.scale, 0))
    else:
        y = F.conv2d(x_k, scaled(w_leaf[:, keep], selection.scale, 1), None, stride, padding, dilation)
        (grad_w,) = torch.autograd.grad(y, w_leaf, grad_out)
    return output, scatter(x, 1, keep, grad_x_k), grad_w, keep


@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 2)], ids=str)
@pytest.mark.parametrize("ratios", [(0.5, 1.0), (1.0, 0.5), (0.25, 0.5)], ids=["bwd", "wu", "bwd+wu"])
def test_conv2d_backward_sampling_topk_matches_recomputed_selections(ratios, geometry):
    bwd_ratio, wu_ratio = ratios
    config = SamplingConfig("topk", ratio=0.5, bwd_ratio=bwd_ratio, wu_ratio=wu_ratio)
    x = spread_columns(spread_columns(torch.randn(4, 6, 7, 7, generator=gen(0), dtype=DOUBLE), 1), 0)
    weight = spread_columns(torch.randn(8, 6, 3, 3, generator=gen(1), dtype=DOUBLE), 0)
    bias = torch.randn(8, generator=gen(2), dtype=DOUBLE)
    x_a, w_a, b_a = leaves(x, weight, bias)
    y = approx_conv2d(x_a, w_a, b_a, *geometry, config=config)
    grad_out = torch.randn(y.shape, generator=gen(3), dtype=DOUBLE)
    y.backward(grad_out)

    output, grad_x, grad_w, keep = conv_backward_reference(x, weight, bias, geometry, grad_out, config)
    torch.testing.assert_close(y, output)
    torch.testing.assert_close(x_a.grad, grad_x)
    torch.testing.assert_close(w_a.grad, grad_w)
    torch.testing.assert_close(b_a.grad, grad_out.sum((0, 2, 3)))
    _, full_x, full_w, _ = conv_backward_reference(x, weight, bias, geometry, grad_out,
                                                   SamplingConfig("topk", ratio=0.5))
    if bwd_ratio < 1:
        assert not torch.allclose(x_a.grad, full_x)
    if wu_ratio < 1:
        assert not torch.allclose(w_a.grad, full_w)
    dropped = torch.ones(6, dtype=torch.bool)
    dropped[keep] = False
    assert torch.all(x_a.grad[:, dropped] == 0) and torch.all(w_a.grad[:, dropped] == 0)


@pytest.mark.parametrize("ratios", [(0.5, 1.0), (1.0, 0.5)], ids=["bwd", "wu"])
@pytest.mark.parametrize("policy", ["nps", "uniform", "bernoulli"])
def test_conv2d_backward_sampling_random_policies_match_reseeded_selections(policy, ratios):
    bwd_ratio, wu_ratio = ratios
    config = SamplingConfig(policy, ratio=0.5, replacement=policy == "nps", bwd_ratio=bwd_ratio, wu_ratio=wu_ratio)
    x = torch.randn(4, 6, 6, 6, generator=gen(0), dtype=DOUBLE)
    weight = torch.randn(8, 6, 3, 3, generator=gen(1), dtype=DOUBLE)
    x_a, w_a = leaves(x, weight)
    y = approx_conv2d(x_a, w_a, None, 1, 1, 1, config, gen(5))
    grad_out = torch.randn(y.shape, generator=gen(3), dtype=DOUBLE)
    y.backward(grad_out)
    output, grad_x, grad_w, _ = conv_backward_reference(x, weight, None, (1, 1, 1), grad_out, config, gen(5))
    torch.testing.assert_close(y, output)
    torch.testing.assert_close(x_a.grad, grad_x)
    torch.testing.assert_close(w_a.grad, grad_w)


@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 2)], ids=str)
def test_conv2d_gradcheck_topk(geometry):
    x = spread_columns(torch.randn(1, 4, 5, 5, generator=gen(0), dtype=DOUBLE), 1).requires_grad_()
    weight = torch.randn(3, 4, 3, 3, generator=gen(1), dtype=DOUBLE, requires_grad=True)
    bias = torch.randn(3, generator=gen(2), dtype=DOUBLE, requires_grad=True)
    config = SamplingConfig("topk", ratio=0.5)
    assert torch.autograd.gradcheck(lambda a, w, b: approx_conv2d(a, w, b, *geometry, config=config), (x, weight, bias))


def test_conv2d_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"approx_conv2d input has shape \(6, 5, 5\)"):
        approx_conv2d(torch.randn(6, 5, 5), torch.randn(2, 6, 3, 3), config=SamplingConfig("topk", ratio=0.5))


# --------------------------------------------------------------------------- memory format


@pytest.mark.parametrize("config", [
    SamplingConfig("topk", ratio=0.5),
    SamplingConfig("nps", ratio=0.5, replacement=True),
    SamplingConfig("topk", ratio=0.5, bwd_ratio=0.5, wu_ratio=0.5),
    SamplingConfig("bernoulli", ratio=0.5, bwd_ratio=0.5),
], ids=["topk", "nps", "topk-bwd-wu", "bernoulli-bwd"])
def test_channels_last_matches_nchw_and_keeps_its_layout(config):
    x = spread_columns(torch.randn(4, 8, 7, 7, generator=gen(0)), 1)
    weight = torch.randn(6, 8, 3, 3, generator=gen(1))
    bias = torch.randn(6, generator=gen(2))
    grad_out = torch.randn(4, 6, 4, 4, generator=gen(3))

    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x_m, w_m, b_m = leaves(x.contiguous(memory_format=memory_format), weight, bias)
        assert x_m.is_contiguous(memory_format=memory_format)
        y = approx_conv2d(x_m, w_m, b_m, 2, 1, 1, config, gen(4))
        # autograd.grad returns the op's own gradient (a leaf's .grad would be re-laid out to match the leaf)
        results.append((y, *torch.autograd.grad(y, (x_m, w_m, b_m), grad_out.contiguous(memory_format=memory_format))))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = results
    # the layouts sum the channel norms in different orders: scores (and so nps scales)
    # differ in the last bits, hence a tolerance a little above fp32's default
    for a, b in ((y1, y0), (gx1, gx0), (gw1, gw0), (gb1, gb0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert gx1.is_contiguous(memory_format=torch.channels_last)
    assert gx0.is_contiguous()


# --------------------------------------------------------------------------- exactness, seeds


@pytest.mark.parametrize("policy", ["exact", "topk", "nps", "uniform", "bernoulli"])
def test_ratio_one_is_the_exact_op(policy):
    config = SamplingConfig(policy, ratio=1.0)
    x = torch.randn(5, 12, generator=gen(0))
    weight, bias = torch.randn(7, 12, generator=gen(1)), torch.randn(7, generator=gen(2))
    assert torch.equal(approx_linear(x, weight, bias, config, gen(3)), F.linear(x, weight, bias))
    image, kernel = torch.randn(2, 4, 6, 6, generator=gen(4)), torch.randn(3, 4, 3, 3, generator=gen(5))
    assert torch.equal(approx_conv2d(image, kernel, bias[:3], 2, 1, 1, config, gen(3)),
                       F.conv2d(image, kernel, bias[:3], 2, 1, 1))


@pytest.mark.parametrize("policy", ["nps", "uniform", "bernoulli"])
def test_same_seed_same_output_different_seed_different_output(policy):
    config = SamplingConfig(policy, ratio=0.3)
    x = torch.randn(6, 40, generator=gen(0))
    weight = torch.randn(5, 40, generator=gen(1))
    image, kernel = torch.randn(2, 16, 5, 5, generator=gen(2)), torch.randn(3, 16, 3, 3, generator=gen(3))

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = gen(seed)
        return approx_linear(x, weight, None, config, generator), approx_conv2d(image, kernel, config=config, generator=generator)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_repeated_indices_accumulate_in_output_and_gradients():
    # with replacement an index drawn twice contributes twice, to the output and to the gradients
    config = SamplingConfig("uniform", ratio=0.5, replacement=True)
    x = torch.randn(3, 4, generator=gen(0), dtype=DOUBLE)
    weight = torch.randn(2, 4, generator=gen(1), dtype=DOUBLE)
    scores = linear_scores(x, weight)
    seed = next(s for s in range(200) if select(scores, 2, config, gen(s)).keep.unique().numel() == 1)
    selection = select(scores, 2, config, gen(seed))
    assert not selection.unique
    i = int(selection.keep[0])
    x_a, w_a = leaves(x, weight)
    y = approx_linear(x_a, w_a, None, config, gen(seed))
    y.backward(torch.ones_like(y))
    # kept twice, each scaled by n / k = 2
    torch.testing.assert_close(y, 4 * torch.outer(x[:, i], weight[:, i]))
    expected_x = torch.zeros_like(x)
    expected_x[:, i] = 4 * weight[:, i].sum()
    expected_w = torch.zeros_like(weight)
    expected_w[:, i] = 4 * x[:, i].sum()
    torch.testing.assert_close(x_a.grad, expected_x)
    torch.testing.assert_close(w_a.grad, expected_w)


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("policy", ["topk", "nps", "bernoulli"])
def test_autocast_bfloat16_linear(policy):
    config = SamplingConfig(policy, ratio=0.5, replacement=policy == "nps", bwd_ratio=0.5)
    x = spread_columns(torch.randn(16, 32, generator=gen(0)), 1)
    weight = torch.randn(24, 32, generator=gen(1)) / 6
    bias = torch.randn(24, generator=gen(2))
    grad_out = torch.randn(16, 24, generator=gen(3))

    x32, w32, b32 = leaves(x, weight, bias)
    y32 = approx_linear(x32, w32, b32, config, gen(4))
    y32.backward(grad_out)
    x16, w16, b16 = leaves(x, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = approx_linear(x16, w16, b16, config, gen(4))
    assert y16.dtype == torch.bfloat16
    y16.float().backward(grad_out)
    for leaf in (x16, w16, b16):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32
    tolerance = dict(rtol=3e-2, atol=3e-2 * float(y32.detach().abs().max()))
    torch.testing.assert_close(y16.float(), y32, **tolerance)
    torch.testing.assert_close(x16.grad, x32.grad, rtol=3e-2, atol=3e-2 * float(x32.grad.abs().max()))
    torch.testing.assert_close(w16.grad, w32.grad, rtol=3e-2, atol=3e-2 * float(w32.grad.abs().max()))
    torch.testing.assert_close(b16.grad, b32.grad, rtol=3e-2, atol=3e-2 * float(b32.grad.abs().max()))


@pytest.mark.parametrize("policy", ["topk", "nps"])
def test_autocast_bfloat16_conv2d(policy):
    config = SamplingConfig(policy, ratio=0.5, replacement=policy == "nps", wu_ratio=0.5)
    x = spread_columns(torch.randn(4, 8, 8, 8, generator=gen(0)), 1)
    weight = torch.randn(6, 8, 3, 3, generator=gen(1)) / 6
    bias = torch.randn(6, generator=gen(2))
    grad_out = torch.randn(4, 6, 8, 8, generator=gen(3))

    x32, w32, b32 = leaves(x, weight, bias)
    y32 = approx_conv2d(x32, w32, b32, 1, 1, 1, config, gen(4))
    y32.backward(grad_out)
    x16, w16, b16 = leaves(x, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = approx_conv2d(x16, w16, b16, 1, 1, 1, config, gen(4))
    assert y16.dtype == torch.bfloat16
    y16.float().backward(grad_out)
    for leaf in (x16, w16, b16):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2 * float(y32.detach().abs().max()))
    torch.testing.assert_close(x16.grad, x32.grad, rtol=3e-2, atol=3e-2 * float(x32.grad.abs().max()))
    torch.testing.assert_close(w16.grad, w32.grad, rtol=3e-2, atol=3e-2 * float(w32.grad.abs().max()))
    torch.testing.assert_close(b16.grad, b32.grad, rtol=3e-2, atol=3e-2 * float(b32.grad.abs().max()))


def test_autocast_at_ratio_one_follows_torch_autocast():
    x = torch.randn(4, 8, generator=gen(0))
    weight = torch.randn(3, 8, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = approx_linear(x, weight, None, SamplingConfig("topk", ratio=1.0))
        expected = F.linear(x, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


# --------------------------------------------------------------------------- saved memory


def saved_storages(forward) -> dict[int, int]:
    """Storage pointer -> bytes of every tensor autograd saves while ``forward()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return seen


def test_kept_by_producer_recognises_a_saved_result():
    a = torch.randn(4, 6, requires_grad=True)
    assert kept_by_producer(torch.relu(a))
    assert kept_by_producer(torch.sigmoid(a))
    assert kept_by_producer(F.relu(a * 1.0, inplace=True))
    assert not kept_by_producer(a)  # a leaf: nobody saves it
    assert not kept_by_producer(a * 2.0)  # mul saves its inputs, not its result
    assert not kept_by_producer(torch.relu(a).clone())
    assert not kept_by_producer(F.dropout(a, 0.5, training=True))  # dropout saves a mask
    with torch.no_grad():
        assert not kept_by_producer(torch.relu(a))


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_input_kept_by_its_producer_is_saved_instead_of_a_sampled_copy(op, spread_path):
    # topk: the same selection either way, so the two paths give identical results
    config = SamplingConfig("topk", ratio=0.5)
    if op == "linear":
        a = torch.randn(6, 10, generator=gen(0), dtype=DOUBLE)
        weight = torch.randn(5, 10, generator=gen(1), dtype=DOUBLE)
        grad_out = torch.randn(6, 5, generator=gen(2), dtype=DOUBLE)
        def apply(x, w):
            return approx_linear(x, w, None, config)
    else:
        a = torch.randn(2, 8, 5, 5, generator=gen(0), dtype=DOUBLE)
        weight = torch.randn(3, 8, 3, 3, generator=gen(1), dtype=DOUBLE)
        grad_out = torch.randn(2, 3, 5, 5, generator=gen(2), dtype=DOUBLE)
        def apply(x, w):
            return approx_conv2d(x, w, None, 1, 1, 1, config)

    results = []
    for kept in (True, False):
        a_leaf, w_leaf = leaves(a, weight)
        x = torch.relu(a_leaf) if kept else torch.relu(a_leaf).clone()  # clone: a new tensor nobody saves
        saved = saved_storages(lambda: results.append((apply(x, w_leaf), x)))  # noqa: B023 - called at once
        y, x = results[-1]
        new = {ptr: size for ptr, size in saved.items() if ptr != x.untyped_storage().data_ptr()}
        if kept:  # the ReLU keeps x: the layer saves x itself and nothing input-sized besides
            assert x.untyped_storage().data_ptr() in saved
            keep_bytes = config.k(weight.shape[1]) * 8  # the selection's int64 indices
            assert sum(new.values()) <= weight.numel() * weight.element_size() + keep_bytes
        else:  # a sampled copy of half the input
            assert x.untyped_storage().data_ptr() not in saved
            assert x.numel() // 2 * x.element_size() in new.values()
        grads = torch.autograd.grad(y, (a_leaf, w_leaf), grad_out)
        results[-1] = (y, *grads)
    for kept_result, copied_result in zip(*results):
        torch.testing.assert_close(kept_result, copied_result, rtol=0, atol=0)
