"""The estimators as documented (issue 13's defects): Bernoulli unbiased even when a draw
keeps nothing, an exact forward at k = n for samplers with replacement, the authors' k
rounding (``k_rounding=floor``) and backward-only sampling (``mode=backward``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxtrain.accounting import ComputeMeter, ProductMACs
from approxtrain.config import ConfigError, default_sampling
from approxtrain.functional import approx_conv2d, approx_linear
from approxtrain.sampling import SamplingConfig, num_kept, select
from approxtrain.surgery import LayerRule, approximate_, attach_meter


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- Bernoulli: E[w_i] = 1


def pair_weights(scores: torch.Tensor, k: int, draws: int, seed: int = 0) -> torch.Tensor:
    """(draws, n): each draw's weight on every pair (its scale where kept, summed; 0 elsewhere)."""
    generator = gen(seed)
    weights = torch.zeros(draws, scores.numel(), dtype=torch.float64)
    for row in weights:
        selection = select(scores, k, SamplingConfig("bernoulli"), generator)
        row.index_add_(0, selection.keep, selection.scale.double())
    return weights


@pytest.mark.parametrize("scores, k", [
    (torch.ones(4), 2),  # P(no pair) = 1/16: the old fallback gave E[w_0] = 1.125
    (torch.rand(50, generator=gen(3)) + 0.05, 3),  # P(no pair) ~ e^-3
    (torch.tensor([100.0] + [1.0] * 9), 1),  # skewed: q_0 = 0.92, the rest 0.009
], ids=["n4-k2-equal", "n50-k3", "n10-k1-skewed"])
def test_bernoulli_weights_are_unbiased_for_small_n_times_ratio(scores, k, one_thread):
    draws = 5_000
    weights = pair_weights(scores, k, draws)
    z = (weights.mean(0) - 1) / (weights.std(0) / draws**0.5)
    assert z.abs().max() < 4.5, z


def test_an_empty_bernoulli_draw_is_the_zero_product():
    scores, generator = torch.ones(4), gen(0)
    empty = None
    for _ in range(200):  # P(no pair) = 1/16 per draw
        selection = select(scores, 2, SamplingConfig("bernoulli", scale=False), generator)
        if selection.scale is not None:
            empty = selection
            break
    assert empty is not None and empty.keep.numel() == 1 and empty.scale.tolist() == [0.0]


def test_conv_weight_gradient_with_bernoulli_batch_sampling_is_unbiased(one_thread):
    """The issue's end-to-end case: sampler=bernoulli wu_ratio=0.5 at batch 4 (k = 2 of 4 samples)."""
    x = torch.randn(4, 3, 6, 6, generator=gen(1), dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, generator=gen(2), dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 2, 4, 4, generator=gen(3), dtype=torch.float64)
    exact = torch.autograd.grad(F.conv2d(x, weight), weight, grad_out)[0]
    config, generator = SamplingConfig("bernoulli", ratio=1.0, wu_ratio=0.5), gen(4)
    draws = 4000
    grads = torch.stack([torch.autograd.grad(approx_conv2d(x, weight, config=config, generator=generator), weight,
                                             grad_out)[0] for _ in range(draws)])
    z = (grads.mean(0) - exact) / (grads.std(0) / draws**0.5)
    assert z.abs().max() < 4.5, z.abs().max()


# --------------------------------------------------------------------------- k = n: the exact forward

WITH_REPLACEMENT = [SamplingConfig("nps", ratio=1.0, replacement=True, wu_ratio=0.5),
                    SamplingConfig("nps", ratio=1.0, replacement=True, bwd_ratio=0.5),
                    SamplingConfig("uniform", ratio=1.0, replacement=True, wu_ratio=0.5)]


def config_id(config: SamplingConfig) -> str:
    return f"{config.policy}-bwd{config.bwd_ratio:g}-wu{config.wu_ratio:g}"


@pytest.mark.parametrize("config", WITH_REPLACEMENT, ids=config_id)
def test_k_equal_n_forward_is_exact_with_replacement_and_backward_still_sampled(config):
    x = torch.randn(16, 12, generator=gen(0), requires_grad=True)
    weight = torch.randn(10, 12, generator=gen(1), requires_grad=True)
    y = approx_linear(x, weight, None, config, gen(2))
    assert (y - x @ weight.t()).abs().max().item() == 0.0
    y.backward(torch.randn(16, 10, generator=gen(3)))
    sampled = weight.grad if config.wu_ratio < 1 else x.grad
    exact = torch.autograd.grad((x @ weight.t()), weight if config.wu_ratio < 1 else x, torch.randn(16, 10, generator=gen(3)))[0]
    assert not torch.allclose(sampled, exact)

    image = torch.randn(4, 6, 7, 7, generator=gen(4), requires_grad=True)
    kernel = torch.randn(5, 6, 3, 3, generator=gen(5), requires_grad=True)
    out = approx_conv2d(image, kernel, config=config, generator=gen(6))
    assert (out - F.conv2d(image, kernel)).abs().max().item() == 0.0
    grad_out = torch.randn(out.shape, generator=gen(7))
    out.backward(grad_out)
    exact_out = F.conv2d(image, kernel)
    target = kernel if config.wu_ratio < 1 else image
    assert not torch.allclose(target.grad, torch.autograd.grad(exact_out, target, grad_out)[0])


def small_model() -> nn.Sequential:
    """conv 3->8 3x3 pad 1 on 8x8 -> conv 8->16 3x3 stride 2 (out 3x3) -> Flatten -> fc 144->10, batch 4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(144, 10))


# Exact MACs per product at batch 4: conv1 4*64*8*3*9 (no input gradient: first layer), conv2 4*9*16*8*9,
# fc 4*144*10. Halving the weight-gradient product's batch (k_w = 2 of 4) halves its MACs.
EXACT = {"0": ProductMACs(55_296, 0, 55_296), "2": ProductMACs(41_472, 41_472, 41_472),
         "5": ProductMACs(5_760, 5_760, 5_760)}


def plan_and_meter(sampling: SamplingConfig) -> tuple[list, ComputeMeter]:
    model = small_model()
    inputs = torch.randn(4, 3, 8, 8)
    plan = approximate_(model, [LayerRule(sampling=sampling)], generator=gen(0), example_input=inputs)
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    F.cross_entropy(model(inputs), torch.arange(4)).backward()
    return plan, meter


def test_k_equal_n_with_replacement_plan_and_meter_agree():
    plan, meter = plan_and_meter(SamplingConfig("nps", ratio=1.0, replacement=True, wu_ratio=0.5))
    assert [row.k for row in plan.rows] == [row.n for row in plan.rows]
    for row in plan.rows:
        expected = ProductMACs(EXACT[row.name].forward, EXACT[row.name].input_grad, EXACT[row.name].weight_grad // 2)
        assert row.approx_macs == meter.entries[row.name].actual == expected, row.name
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction)


# --------------------------------------------------------------------------- k_rounding


def test_k_rounding_floor_is_the_authors_int_n_times_ratio():
    assert (num_kept(784, 0.4, rounding="floor"), num_kept(784, 0.4)) == (313, 314)
    assert (num_kept(32, 0.3, rounding="floor"), num_kept(32, 0.3)) == (9, 10)
    assert SamplingConfig("topk", ratio=0.4, k_rounding="floor").k(784) == 313
    assert SamplingConfig("topk", ratio=0.3, k_rounding="floor").k(32) == 9
    # floored to 0 then raised to min_k, as the authors' min(max(int(n r), minimal_k), n)
    table2 = SamplingConfig("topk", ratio=0.4, bwd_ratio=0.05, wu_ratio=0.05, bwd_min_k=10, wu_min_k=10, k_rounding="floor")
    assert (table2.bwd_k(500), table2.bwd_k(10), table2.wu_k(50)) == (25, 10, 10)
    assert SamplingConfig("topk", ratio=0.01, k_rounding="floor").k(32) == 1


@pytest.mark.parametrize("rounding, reduction", [("nearest", 0.6694), ("floor", 0.6924)])
def test_k_rounding_moves_the_cnn_30_percent_compute_reduction(rounding, reduction):
    """Sec. 4.1's "about 68 %": conv2 keeps 10 (nearest) or 9 (floor) of 32 channels, fc1 941 or 940 of 3136."""
    from approxtrain.models.cnn import ConvNet

    torch.manual_seed(0)
    rules = [LayerRule(match="conv1", exact=True), LayerRule(sampling=SamplingConfig("topk", ratio=0.3, k_rounding=rounding))]
    plan = approximate_(ConvNet(1, (28, 28), 10), rules, example_input=torch.randn(2, 1, 28, 28), batch_size=50)
    assert {row.name: row.k for row in plan.rows}["conv2"] == (9 if rounding == "floor" else 10)
    assert plan.compute_reduction == pytest.approx(reduction, abs=5e-5)


def test_k_rounding_is_validated_in_one_line():
    with pytest.raises(ValueError, match=r"^k_rounding='up' is invalid; allowed: nearest, floor$"):
        SamplingConfig("topk", k_rounding="up")
    with pytest.raises(ConfigError, match=r"^sampler.k_rounding='up' is invalid; allowed: nearest, floor$"):
        default_sampling({"sampler": {"name": "topk", "k_rounding": "up"}, "ratio": 0.5})


# The authors' top-k CRS forward, re-expressed as a reference (github adelmanm/approx,
# src/pytorch/approx_mul_pytorch/functional/approx_linear.py: linear_top_k, and
# functional/approx_conv2d.py: conv2d_top_k, with modules/utils.py: topk_indices):
# k = min(max(int(float(n) * ratio), minimal_k), n); at k = n the exact op; else the k pairs
# of largest |column| * |row| (argsort descending), multiplied unscaled.
def official_k(n: int, ratio: float, minimal_k: int) -> int:
    return min(max(int(float(n) * ratio), minimal_k), n)


def official_linear_top_k(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ratio: float, minimal_k: int = 1):
    n = x.shape[-1]
    k = official_k(n, ratio, minimal_k)
    if k == n:
        return F.linear(x, weight, bias)
    scores = torch.norm(x.reshape(-1, n), dim=0) * torch.norm(weight.t(), dim=1)
    keep = scores.argsort(descending=True)[:k]
    return x.index_select(-1, keep) @ weight.t().index_select(0, keep) + bias


def official_conv2d_top_k(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ratio: float, minimal_k: int = 1,
                          padding: int = 0):
    n = x.shape[1]
    k = official_k(n, ratio, minimal_k)
    if k == n:
        return F.conv2d(x, weight, bias, padding=padding)
    x_norms = torch.norm(torch.norm(x.reshape(x.shape[0], n, -1), dim=2), dim=0)
    w_norms = torch.norm(torch.norm(weight.reshape(weight.shape[0], n, -1), dim=2), dim=0)
    keep = (x_norms * w_norms).argsort(descending=True)[:k]
    return F.conv2d(x.index_select(1, keep), weight.index_select(1, keep), bias, padding=padding)


LINEAR_CASES = [(784, 0.4), (500, 0.05), (100, 0.29), (32, 0.3), (10, 0.15), (12, 1.0)]


@pytest.mark.parametrize("n, ratio", LINEAR_CASES)
def test_topk_linear_with_floor_matches_the_official_code(n, ratio):
    x = torch.randn(20, n, generator=gen(n), dtype=torch.float64)
    weight = torch.randn(7, n, generator=gen(n + 1), dtype=torch.float64)
    bias = torch.randn(7, generator=gen(n + 2), dtype=torch.float64)
    config = SamplingConfig("topk", ratio=ratio, scale=False, k_rounding="floor")
    ours = approx_linear(x, weight, bias, config)
    assert torch.allclose(ours, official_linear_top_k(x, weight, bias, ratio), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels, ratio", [(32, 0.3), (64, 0.4), (10, 0.15), (6, 1.0)])
def test_topk_conv2d_with_floor_matches_the_official_code(channels, ratio):
    x = torch.randn(3, channels, 9, 9, generator=gen(channels), dtype=torch.float64)
    weight = torch.randn(5, channels, 3, 3, generator=gen(channels + 1), dtype=torch.float64)
    bias = torch.randn(5, generator=gen(channels + 2), dtype=torch.float64)
    config = SamplingConfig("topk", ratio=ratio, scale=False, k_rounding="floor")
    ours = approx_conv2d(x, weight, bias, padding=1, config=config)
    assert torch.allclose(ours, official_conv2d_top_k(x, weight, bias, ratio, padding=1), rtol=1e-12, atol=1e-12)


def test_nearest_rounding_differs_from_the_official_code_where_k_differs():
    x = torch.randn(20, 784, generator=gen(0), dtype=torch.float64)
    weight = torch.randn(7, 784, generator=gen(1), dtype=torch.float64)
    bias = torch.zeros(7, dtype=torch.float64)
    ours = approx_linear(x, weight, bias, SamplingConfig("topk", ratio=0.4, scale=False))  # k = 314, not 313
    assert not torch.allclose(ours, official_linear_top_k(x, weight, bias, 0.4))


# --------------------------------------------------------------------------- mode=backward


def test_backward_mode_forward_is_exact_and_both_gradient_products_are_sampled():
    config = SamplingConfig("topk", ratio=0.5, mode="backward")
    assert (config.k(12), config.bwd_k(10), config.wu_k(16)) == (12, 5, 8) and config.samples_backward
    x = torch.randn(16, 12, generator=gen(0), requires_grad=True)
    weight = torch.randn(10, 12, generator=gen(1), requires_grad=True)
    grad_out = torch.randn(16, 10, generator=gen(2))
    y = approx_linear(x, weight, None, config)
    assert torch.equal(y, F.linear(x, weight))
    y.backward(grad_out)
    # top-k: the 5 output features and the 8 rows of largest |dY_i| |W_i| / |dY_r| |X_r|
    keep_out = (grad_out.norm(dim=0) * weight.detach().norm(dim=1)).topk(5).indices
    keep_rows = (grad_out.norm(dim=1) * x.detach().norm(dim=1)).topk(8).indices
    assert torch.allclose(x.grad, grad_out[:, keep_out] @ weight.detach()[keep_out])
    assert torch.allclose(weight.grad, grad_out[keep_rows].t() @ x.detach()[keep_rows])


def test_backward_mode_plan_and_meter_count_exact_forward_and_sampled_gradients():
    plan, meter = plan_and_meter(SamplingConfig("topk", ratio=0.5, mode="backward"))
    # input gradient: half the output channels/features (conv2 8 of 16, fc 5 of 10); weight gradient: 2 of 4 samples
    expected = {"0": ProductMACs(55_296, 0, 27_648), "2": ProductMACs(41_472, 20_736, 20_736),
                "5": ProductMACs(5_760, 2_880, 2_880)}
    for row in plan.rows:
        assert row.k == row.n and row.ratio == 1.0 and "backward-only" in row.note
        assert row.approx_macs == meter.entries[row.name].actual == expected[row.name], row.name
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction)


@pytest.mark.parametrize("key", ["bwd_ratio", "wu_ratio"])
def test_backward_mode_takes_its_ratio_from_ratio_alone(key):
    with pytest.raises(ValueError, match=rf"^{key}=0.5 is invalid with mode=backward .*; allowed: 1.0$"):
        SamplingConfig("topk", ratio=0.3, mode="backward", **{key: 0.5})
    with pytest.raises(ConfigError, match=r"^sampler.mode='both' is invalid; allowed: forward, backward$"):
        default_sampling({"sampler": {"name": "topk", "mode": "both"}, "ratio": 0.5})
