"""Model surgery: rule matching, in-place swaps that keep parameters and checkpoints,
grouped-convolution fallback, rule errors and the Plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import LayerRule, Plan, approximate_, rules_from_dicts

TOPK_HALF = SamplingConfig("topk", ratio=0.5)


class SmallNet(nn.Module):
    """conv1 (3->8) -> conv2 (8->16, stride 2) -> block.{0: depthwise conv, 1: conv} -> head.fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1))
        self.head = nn.Sequential()
        self.head.add_module("fc", nn.Linear(16 * 4 * 4, 10))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.block(x))
        return self.head(x.flatten(1))


@pytest.fixture
def model() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


def layer_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


# --------------------------------------------------------------------------- matching


def test_first_matching_rule_wins_and_unmatched_layers_stay_exact(model):
    rules = [LayerRule(match="conv1", exact=True),
             LayerRule(type="Conv2d", sampling=SamplingConfig("nps", ratio=0.25)),
             LayerRule(match="head.*", sampling=TOPK_HALF)]
    plan = approximate_(model, rules)
    assert layer_types(model) == {"conv1": nn.Conv2d, "conv2": ApproxConv2d, "block.0": nn.Conv2d,
                                  "block.1": ApproxConv2d, "head.fc": ApproxLinear}
    rows = {row.name: row for row in plan.rows}
    assert [row.name for row in plan.rows] == ["conv1", "conv2", "block.0", "block.1", "head.fc"]
    assert (rows["conv1"].policy, rows["conv1"].rule, rows["conv1"].k, rows["conv1"].n) == ("exact", 0, 3, 3)
    assert (rows["conv2"].policy, rows["conv2"].rule, rows["conv2"].k, rows["conv2"].n) == ("nps", 1, 2, 8)
    assert rows["conv2"].ratio == 0.25
    assert (rows["head.fc"].policy, rows["head.fc"].k, rows["head.fc"].n, rows["head.fc"].type) == ("topk", 128, 256, "Linear")
    assert model.conv2.sampling == SamplingConfig("nps", ratio=0.25)
    # without an example input the plan has no MACs
    assert plan.exact_macs == 0 and plan.compute_reduction == 0.0


def test_unmatched_layers_are_noted(model):
    plan = approximate_(model, [LayerRule(match="head.fc", sampling=TOPK_HALF)])
    notes = {row.name: row.note for row in plan.rows}
    assert notes["conv1"] == "no rule" and notes["head.fc"] == ""
    assert type(model.conv1) is nn.Conv2d


def test_regex_and_type_matching(model):
    approximate_(model, [LayerRule(match=r"re:conv[0-9]", type="Conv2d", sampling=TOPK_HALF),
                         LayerRule(match="re:.*fc", type="Linear", sampling=TOPK_HALF)])
    assert layer_types(model) == {"conv1": ApproxConv2d, "conv2": ApproxConv2d, "block.0": nn.Conv2d,
                                  "block.1": nn.Conv2d, "head.fc": ApproxLinear}


def test_regex_is_a_full_match(model):
    with pytest.raises(ValueError, match="matches no layer"):
        approximate_(model, [LayerRule(match="re:conv", sampling=TOPK_HALF)])


def test_surgery_can_be_undone_and_redone(model):
    approximate_(model, [LayerRule(sampling=TOPK_HALF)])
    assert type(model.conv2) is ApproxConv2d
    weight = model.conv2.weight
    plan = approximate_(model, [LayerRule(exact=True)])
    assert all(row.policy == "exact" for row in plan.rows)
    assert type(model.conv2) is nn.Conv2d and type(model.head.fc) is nn.Linear
    assert model.conv2.weight is weight
    assert not hasattr(model.conv2, "sampling")
    approximate_(model, [LayerRule(sampling=SamplingConfig("nps", ratio=0.3))])
    assert type(model.conv2) is ApproxConv2d and model.conv2.sampling.policy == "nps"


def test_exact_policy_rule_is_an_exact_rule(model):
    rules = rules_from_dicts([{"match": "conv*", "sampler": "exact"}, {"ratio": 0.5}], TOPK_HALF)
    assert rules[0].exact
    approximate_(model, rules)
    assert type(model.conv1) is nn.Conv2d and type(model.head.fc) is ApproxLinear


# --------------------------------------------------------------------------- parameters and checkpoints


def test_surgery_keeps_the_very_same_parameters_and_an_old_optimizer_trains_them(model):
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    approximate_(model, [LayerRule(match="conv1", exact=True), LayerRule(sampling=TOPK_HALF)])
    assert type(model.conv2) is ApproxConv2d
    after = dict(model.named_parameters())
    assert after.keys() == parameters.keys()
    assert all(after[name] is parameters[name] for name in parameters)
    before = {name: p.detach().clone() for name, p in parameters.items()}
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name in ("conv2.weight", "head.fc.weight", "conv1.weight", "block.1.weight"):
        assert not torch.equal(model.get_parameter(name), before[name]), name


def test_state_dict_round_trips_between_exact_and_approximate_models():
    torch.manual_seed(0)
    exact = SmallNet()
    approx = SmallNet()
    approximate_(approx, [LayerRule(match="conv1", exact=True), LayerRule(sampling=SamplingConfig("nps", ratio=0.3))])
    assert exact.state_dict().keys() == approx.state_dict().keys()

    approx.load_state_dict(exact.state_dict())
    x = torch.randn(2, 3, 8, 8)
    # equal up to summation order: ApproxLinear stores its weight column-major, a different GEMM kernel
    torch.testing.assert_close(approx.eval()(x), exact.eval()(x), rtol=1e-6, atol=1e-7)
    assert approx.head.fc.weight.stride() == (1, 10)

    with torch.no_grad():
        for parameter in approx.parameters():
            parameter.add_(0.01)
    exact.load_state_dict(approx.state_dict())
    for (name, a), (_, e) in zip(approx.state_dict().items(), exact.state_dict().items()):
        assert torch.equal(a, e), name
    torch.testing.assert_close(approx(x), exact(x), rtol=1e-6, atol=1e-7)


def test_generator_is_shared_by_the_random_layers(model):
    generator = torch.Generator().manual_seed(0)
    approximate_(model, [LayerRule(sampling=SamplingConfig("bernoulli", ratio=0.5))], generator=generator)
    assert model.conv2.generator is generator and model.head.fc.generator is generator


# --------------------------------------------------------------------------- grouped convolutions


def test_grouped_convolutions_stay_exact_with_a_plan_note(model):
    plan = approximate_(model, [LayerRule(sampling=TOPK_HALF)], example_input=torch.randn(2, 3, 8, 8))
    assert type(model.block[0]) is nn.Conv2d
    row = next(row for row in plan.rows if row.name == "block.0")
    assert row.policy == "exact" and row.k == row.n == 1
    assert "groups=16" in row.note and "exact" in row.note
    # its MACs are exact (C / groups = 1 input channel per output)
    assert row.exact_macs == row.approx_macs and row.exact_macs.forward == 2 * 4 * 4 * 16 * 1 * 9
    model.train()(torch.randn(2, 3, 8, 8)).sum().backward()  # and it trains


# --------------------------------------------------------------------------- rule errors


def test_unknown_rule_key_is_named():
    with pytest.raises(ValueError) as error:
        rules_from_dicts([{"match": "fc*", "ratoi": 0.5}], TOPK_HALF)
    message = str(error.value)
    assert "unknown key(s) ratoi" in message and "\n" not in message
    assert "ratio" in message and "sampler" in message


def test_bad_rule_type_is_named():
    with pytest.raises(ValueError, match="type='Conv3d' is unknown; allowed: Linear, Conv2d"):
        LayerRule(type="Conv3d")
    with pytest.raises(ValueError, match="type='Conv3d'"):
        rules_from_dicts([{"type": "Conv3d"}], TOPK_HALF)


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match=r"match='re:conv\[' is not a valid regular expression"):
        LayerRule(match="re:conv[")


def test_bad_exact_flag_is_named():
    with pytest.raises(ValueError, match="exact='yes'"):
        rules_from_dicts([{"exact": "yes"}], TOPK_HALF)


@pytest.mark.parametrize("values, fragment", [
    ({"ratio": 0}, "ratio=0.0"),
    ({"ratio": 1.5}, "ratio=1.5"),
    ({"ratio": "abc"}, "ratio='abc'"),
    ({"sampler": "random"}, "'random'"),
    ({"min_k": 0}, "min_k=0"),
    ({"sampler": "topk", "replacement": True}, "replacement=true"),
])
def test_bad_sampling_values_in_rules_are_named(values, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        rules_from_dicts([values], TOPK_HALF)


def test_rule_matching_no_layer_is_an_error_naming_the_rule(model):
    rules = [LayerRule(match="conv*", sampling=TOPK_HALF), LayerRule(match="decoder", sampling=TOPK_HALF)]
    with pytest.raises(ValueError) as error:
        approximate_(model, rules)
    message = str(error.value)
    assert "layer rule #2 (match='decoder' sampler=topk ratio=0.5) matches no layer" in message
    assert "conv1" in message and "head.fc" in message and "\n" not in message


def test_shadowed_rule_is_an_error(model):
    with pytest.raises(ValueError, match="layer rule #2 .* matches no layer"):
        approximate_(model, [LayerRule(sampling=TOPK_HALF), LayerRule(type="Linear", exact=True)])


def test_rules_from_dicts_fills_defaults_and_accepts_sampler_alias():
    default = SamplingConfig("topk", ratio=0.4, bwd_ratio=0.05, bwd_min_k=10)
    rules = rules_from_dicts([{"match": "fc1", "sampler": "nps", "replacement": True},
                              {"type": "Conv2d", "ratio": 0.3},
                              {"match": "conv1", "exact": True}], default)
    assert rules[0].sampling == SamplingConfig("nps", ratio=0.4, replacement=True, bwd_ratio=0.05, bwd_min_k=10)
    assert rules[1].type == "Conv2d" and rules[1].sampling.ratio == 0.3 and rules[1].sampling.bwd_min_k == 10
    assert rules[2].exact and rules[2].match == "conv1"


# --------------------------------------------------------------------------- plan


def test_plan_to_dicts_and_str(model):
    plan = approximate_(model, [LayerRule(match="conv1", exact=True), LayerRule(sampling=TOPK_HALF)],
                        example_input=torch.randn(2, 3, 8, 8), batch_size=8)
    assert isinstance(plan, Plan) and plan.batch_size == 8
    rows = plan.to_dicts()
    assert [row["name"] for row in rows] == ["conv1", "conv2", "block.0", "block.1", "head.fc"]
    fc = rows[-1]
    assert fc["exact_macs"] == 3 * 8 * 256 * 10 and fc["approx_macs"] == 3 * 8 * 128 * 10
    assert fc["macs"]["exact"] == {"forward": 8 * 256 * 10, "input_grad": 8 * 256 * 10, "weight_grad": 8 * 256 * 10}
    text = str(plan)
    assert "head.fc" in text and "groups=16 > 1: kept exact" in text
    assert f"compute reduction: {plan.compute_reduction:.1%}" in text
    assert 0 < plan.compute_reduction < 0.5


def test_example_input_trace_restores_modes_and_leaves_batchnorm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.train()
    model[1].eval()
    stats = model[1].running_mean.clone()
    approximate_(model, [LayerRule(sampling=TOPK_HALF)], example_input=torch.randn(2, 3, 8, 8))
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_approximate_wide_resnet_saves_no_more_activations_than_exact(memory_format):
    # every conv input of a pre-activation WRN is a ReLU output, which autograd keeps
    # anyway: the approximate convs save it rather than new sampled copies
    from approxtrain.models import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2, num_classes=10).train().to(memory_format=memory_format)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=memory_format)
    exact = _saved_activation_bytes(model, x)
    approximate_(model, [LayerRule(match="block*", type="Conv2d", sampling=SamplingConfig("topk", ratio=0.5))])
    approximate = _saved_activation_bytes(model, x)
    # beyond the activations, each sampled conv keeps its selection's int64 indices
    keep_bytes = sum(8 * m.sampling.k(m.in_channels) for m in model.modules() if isinstance(m, ApproxConv2d))
    assert approximate <= exact + keep_bytes, (approximate, exact, keep_bytes)
