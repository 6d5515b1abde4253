"""ApproxLinear / ApproxConv2d: exact where they must be (ratio 1, eval), padding modes,
parameter sharing, state_dict compatibility, seeds and argument checks."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from approxtrain.accounting import LayerCompute
from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.sampling import POLICIES, SamplingConfig, select


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def all_policy_configs(ratio: float) -> list[SamplingConfig]:
    configs = [SamplingConfig(policy, ratio=ratio) for policy in POLICIES]
    configs += [SamplingConfig("nps", ratio=ratio, replacement=True), SamplingConfig("uniform", ratio=ratio, replacement=True),
                SamplingConfig("nps", ratio=ratio, scale=False)]
    return configs


def config_id(config: SamplingConfig) -> str:
    return f"{config.policy}-rep{int(config.replacement)}-scale{int(config.scale)}"


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(20, 7)


@pytest.fixture
def conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 4, 3, stride=2, padding=1)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("config", all_policy_configs(1.0), ids=config_id)
def test_linear_ratio_one_equals_nn_linear_exactly(linear, config):
    approx = ApproxLinear.from_linear(linear, config, gen(0)).train()
    for shape in [(5, 20), (3, 4, 20)]:
        x = torch.randn(*shape, generator=gen(1), requires_grad=True)
        y, y_ref = approx(x), linear(x)
        assert torch.equal(y, y_ref)
        grad_x, grad_w, grad_b = torch.autograd.grad(y.sum(), (x, approx.weight, approx.bias))
        ref_x, ref_w, ref_b = torch.autograd.grad(y_ref.sum(), (x, linear.weight, linear.bias))
        torch.testing.assert_close(grad_x, ref_x)
        torch.testing.assert_close(grad_w, ref_w)
        torch.testing.assert_close(grad_b, ref_b)


@pytest.mark.parametrize("config", all_policy_configs(1.0), ids=config_id)
def test_conv_ratio_one_equals_nn_conv2d_exactly(conv, config):
    approx = ApproxConv2d.from_conv2d(conv, config, gen(0)).train()
    x = torch.randn(2, 6, 9, 9, generator=gen(1), requires_grad=True)
    y, y_ref = approx(x), conv(x)
    assert torch.equal(y, y_ref)
    grads = torch.autograd.grad(y.sum(), (x, approx.weight, approx.bias))
    refs = torch.autograd.grad(y_ref.sum(), (x, conv.weight, conv.bias))
    for grad, ref in zip(grads, refs):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("config", all_policy_configs(0.1), ids=config_id)
def test_eval_mode_is_exact_even_at_low_ratio(linear, conv, config):
    approx_linear = ApproxLinear.from_linear(linear, config, gen(0))
    approx_conv = ApproxConv2d.from_conv2d(conv, config, gen(0))
    x = torch.randn(5, 20, generator=gen(1))
    image = torch.randn(2, 6, 9, 9, generator=gen(2))
    if config.policy != "exact":  # training mode really samples
        assert not torch.allclose(approx_linear.train()(x), linear(x))
        assert not torch.allclose(approx_conv.train()(image), conv(image))
    approx_linear.eval()
    approx_conv.eval()
    assert torch.equal(approx_linear(x), linear(x))
    assert torch.equal(approx_conv(image), conv(image))
    with torch.no_grad():
        assert torch.equal(approx_linear(x), linear(x))


def test_training_mode_samples_like_the_functional_op(linear):
    config = SamplingConfig("topk", ratio=0.3)
    approx = ApproxLinear.from_linear(linear, config)
    x = torch.randn(8, 20, generator=gen(1))
    scores = torch.linalg.vector_norm(x, dim=0) * torch.linalg.vector_norm(linear.weight, dim=0)
    keep = select(scores, 6, config).keep
    expected = x[:, keep] @ linear.weight[:, keep].t() + linear.bias
    torch.testing.assert_close(approx(x), expected)


# --------------------------------------------------------------------------- padding


PADDINGS = [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=(3, 5), padding="same"),
    dict(kernel_size=(5, 1), padding="same", dilation=(1, 3)),
    dict(kernel_size=(4, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=4, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(2, 1), stride=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular"),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("options", PADDINGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_padding_modes_match_nn_conv2d_at_ratio_one_and_in_eval(options):
    torch.manual_seed(0)
    reference = nn.Conv2d(5, 4, **options)
    x = torch.randn(2, 5, 9, 8, generator=gen(1))
    expected = reference(x)
    for config in (SamplingConfig("topk", ratio=1.0), SamplingConfig("bernoulli", ratio=1.0)):
        approx = ApproxConv2d.from_conv2d(reference, config).train()
        assert torch.equal(approx(x), expected)
    approx = ApproxConv2d.from_conv2d(reference, SamplingConfig("topk", ratio=0.2)).eval()
    assert torch.equal(approx(x), expected)


@pytest.mark.parametrize("options", PADDINGS[:3] + PADDINGS[6:8], ids=["same3", "same4", "same3x5", "reflect-same3", "reflect-same4"])
def test_padding_modes_sample_the_padded_input(options):
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 4, **options)
    config = SamplingConfig("topk", ratio=0.5)
    approx = ApproxConv2d.from_conv2d(reference, config).train()
    x = torch.randn(2, 6, 9, 8, generator=gen(1))
    y = approx(x)
    assert y.shape == reference(x).shape == (2, 4, 9, 8)
    # reference: pad the way nn.Conv2d does, then convolve the top-k channels of the padded input
    padded = F.pad(x, reference._reversed_padding_repeated_twice,
                   mode="constant" if reference.padding_mode == "zeros" else reference.padding_mode)
    scores = torch.linalg.vector_norm(padded, dim=(0, 2, 3)) * torch.linalg.vector_norm(reference.weight, dim=(0, 2, 3))
    keep = select(scores, 3, config).keep
    expected = F.conv2d(padded[:, keep], reference.weight[:, keep], reference.bias, reference.stride, 0, reference.dilation)
    torch.testing.assert_close(y, expected)


# --------------------------------------------------------------------------- construction


def test_constructors_and_extra_repr():
    config = SamplingConfig("nps", ratio=0.4, replacement=True, bwd_ratio=0.5)
    layer = ApproxLinear(784, 500, sampling=config)
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (500, 784)
    text = repr(layer)
    assert "in_features=784, out_features=500" in text
    assert "sampler=nps, ratio=0.4, k=314/784" in text and "replacement=True" in text and "bwd_ratio=0.5" in text
    conv = ApproxConv2d(16, 32, 3, padding=1, sampling=SamplingConfig("topk", ratio=0.5, wu_ratio=0.25))
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (32, 16, 3, 3)
    text = repr(conv)
    assert "sampler=topk, ratio=0.5, k=8/16" in text and "wu_ratio=0.25" in text and "replacement" not in text
    assert ApproxLinear(3, 2, bias=False).bias is None


def test_from_layer_shares_parameters_hooks_and_mode(linear, conv):
    calls = []
    linear.register_forward_hook(lambda *args: calls.append("hook"))
    linear.eval()
    approx = ApproxLinear.from_linear(linear, SamplingConfig("topk", ratio=0.5), gen(0))
    assert approx.weight is linear.weight and approx.bias is linear.bias
    assert not approx.training and approx.compute is None and approx.generator is not None
    approx(torch.randn(2, 20))
    assert calls == ["hook"]
    approx_conv = ApproxConv2d.from_conv2d(conv, SamplingConfig("topk", ratio=0.5))
    assert approx_conv.weight is conv.weight and approx_conv.bias is conv.bias
    assert approx_conv.stride == (2, 2) and approx_conv.padding == (1, 1)


def test_state_dicts_are_interchangeable(linear, conv):
    approx = ApproxLinear(20, 7, sampling=SamplingConfig("topk", ratio=0.5))
    assert approx.state_dict().keys() == linear.state_dict().keys()
    approx.load_state_dict(linear.state_dict())
    assert torch.equal(approx.weight, linear.weight)
    approx_conv = ApproxConv2d(6, 4, 3, stride=2, padding=1, sampling=SamplingConfig("nps", ratio=0.5))
    approx_conv.load_state_dict(conv.state_dict())
    fresh = nn.Conv2d(6, 4, 3, stride=2, padding=1)
    fresh.load_state_dict(approx_conv.state_dict())
    assert torch.equal(fresh.weight, conv.weight) and torch.equal(fresh.bias, conv.bias)



def test_approx_linear_stores_its_weight_column_major(linear):
    values = linear.weight.detach().clone()
    parameter = linear.weight
    approx = ApproxLinear.from_linear(linear, SamplingConfig("topk", ratio=0.5))
    assert approx.weight is parameter and torch.equal(approx.weight, values)  # same Parameter, same values
    assert approx.weight.stride() == (1, 7) and linear.weight.stride() == (1, 7)  # re-laid out in place
    assert ApproxLinear(20, 7).weight.stride() == (1, 7)
    assert ApproxLinear(20, 7, column_major_weight=False).weight.stride() == (20, 1)
    assert ApproxLinear.from_linear(nn.Linear(20, 7), SamplingConfig(), column_major_weight=False).weight.stride() == (20, 1)
    assert approx.double().weight.stride() == (1, 7)  # dtype and device moves keep the layout
    # a checkpoint of it loads into a plain nn.Linear, values intact
    buffer = io.BytesIO()
    torch.save(approx.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Linear(20, 7).double()
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.weight, approx.weight) and fresh.weight.is_contiguous()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_column_major_weight_trains_like_a_row_major_one(optimizer):
    # the same steps on the same values, one weight column-major, one row-major
    torch.manual_seed(0)
    layers = [ApproxLinear(20, 7, sampling=SamplingConfig("topk", ratio=0.5), column_major_weight=major) for major in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[optimizer]
    optimizers = [make(layer.parameters()) for layer in layers]
    for step in range(3):
        x = torch.randn(16, 20, generator=gen(step))
        for layer, opt in zip(layers, optimizers):
            opt.zero_grad()
            layer(x).square().sum().backward()
            assert layer.weight.grad.stride() == layer.weight.stride()  # the gradient in the weight's layout
            opt.step()
    assert layers[0].weight.stride() == (1, 7)
    torch.testing.assert_close(layers[0].weight, layers[1].weight, rtol=1e-5, atol=1e-6)

def test_grouped_convolutions_are_rejected():
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        ApproxConv2d(4, 4, 3, groups=2, sampling=SamplingConfig("topk", ratio=0.5))
    with pytest.raises(ValueError, match="groups=4 cannot be sampled"):
        ApproxConv2d.from_conv2d(nn.Conv2d(4, 8, 3, groups=4), SamplingConfig("topk", ratio=0.5))


@pytest.mark.parametrize("policy", ["nps", "uniform", "bernoulli"])
def test_module_same_seed_same_output(linear, conv, policy):
    config = SamplingConfig(policy, ratio=0.3)
    x = torch.randn(5, 20, generator=gen(1))
    image = torch.randn(2, 6, 9, 9, generator=gen(2))

    def run(seed: int) -> list[torch.Tensor]:
        generator = gen(seed)
        layer = ApproxLinear.from_linear(linear, config, generator)
        layer_conv = ApproxConv2d.from_conv2d(conv, config, generator)
        return [layer(x), layer(x), layer_conv(image)]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # the generator advances
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_modules_record_compute_in_training_only(linear):
    approx = ApproxLinear.from_linear(linear, SamplingConfig("topk", ratio=0.5))
    approx.compute = LayerCompute()
    x = torch.randn(4, 20, requires_grad=True)
    approx(x).sum().backward()
    assert approx.compute.calls == 1
    assert approx.compute.actual.forward == 4 * 10 * 7 and approx.compute.exact.forward == 4 * 20 * 7
    assert approx.compute.actual.input_grad == 4 * 10 * 7 and approx.compute.actual.weight_grad == 4 * 10 * 7
    approx.eval()
    approx(x)
    assert approx.compute.calls == 1
