"""Bring-your-own models' layers that are not plain nn.Linear/nn.Conv2d: subclasses with their own
forward stay exact (said in the plan), parametrized layers sample their computed weight, and a model
whose products surgery cannot see says so instead of reporting nothing."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from approxtrain.accounting import ComputeMeter, ProductMACs
from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import Trainer
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import approximate_, attach_meter, rules_from_dicts
from byo_nets import HFConv1D

TOPK_HALF = SamplingConfig("topk", ratio=0.5)
TOPK_ALL = SamplingConfig("topk", ratio=1.0)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardised in forward (BiT, NFNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow's 'SAME' padding, computed in forward (tf_* models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = max((math.ceil(height / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - height, 0)
        pad_w = max((math.ceil(width / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class PlainSubclass(nn.Conv2d):
    """A subclass that only adds an attribute: its computation is nn.Conv2d's."""

    tag = "plain"


class ThirdPartyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.std = StdConv2d(3, 8, 3, padding=1)
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.plain = PlainSubclass(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.plain(F.relu(self.same(F.relu(self.std(x)))))
        return self.head(x.mean(dim=(2, 3)))


def test_subclasses_with_their_own_forward_stay_exact_and_the_plan_says_why():
    torch.manual_seed(0)
    model, x = ThirdPartyNet(), torch.randn(4, 3, 9, 9)
    model.eval()
    expected, std_expected, same_expected = model(x), model.std(x), model.same(model.std(x))
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=x[:2])
    rows = {row.name: row for row in plan.rows}
    assert type(model.std) is StdConv2d and type(model.same) is Conv2dSame
    assert (rows["std"].policy, rows["std"].note) == ("exact", "kept exact: StdConv2d overrides forward")
    assert (rows["same"].policy, rows["same"].note) == ("exact", "kept exact: Conv2dSame overrides forward")
    assert rows["std"].exact_macs.total == rows["std"].approx_macs.total > 0  # counted, as exact
    assert isinstance(model.plain, ApproxConv2d) and rows["plain"].policy == "topk"
    assert isinstance(model.head, ApproxLinear)
    model.eval()
    torch.testing.assert_close(model.std(x), std_expected, rtol=0, atol=0)  # the layers kept exact: bit for bit
    torch.testing.assert_close(model.same(model.std(x)), same_expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x), expected)  # the sampled ones are exact in eval (column-major weight: rounding)
    model.train()
    std_alone = StdConv2d(3, 8, 3, padding=1)
    std_alone.load_state_dict(model.std.state_dict())
    torch.testing.assert_close(model.std(x), std_alone(x), rtol=0, atol=0)  # training: unchanged too


def parametrized_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(),
                         parametrizations.spectral_norm(nn.Linear(8 * 4 * 4, 16)), nn.ReLU(),
                         parametrizations.weight_norm(nn.Linear(16, 5)))


def test_parametrized_layers_sample_their_computed_weight():
    x, target = torch.randn(4, 3, 6, 6), torch.randint(5, (4,))
    exact, model = parametrized_net(), parametrized_net()
    plan = approximate_(model, rules_from_dicts([{}], TOPK_ALL), example_input=x[:2])
    assert [row.policy for row in plan.rows if row.type in ("Linear", "Conv2d")] == ["topk"] * 3
    assert isinstance(model[0], ApproxConv2d) and isinstance(model[3], ApproxLinear)
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[3], "weight")
    assert sorted(model.state_dict()) == sorted(exact.state_dict())
    exact.train(), model.train()
    torch.testing.assert_close(model(x), exact(x))  # ratio 1.0: every pair kept
    F.cross_entropy(model(x), target).backward()
    F.cross_entropy(exact(x), target).backward()
    for (name, gradient), (_, expected) in zip(model.named_parameters(), exact.named_parameters()):
        torch.testing.assert_close(gradient.grad, expected.grad, msg=name)
    parametrize.remove_parametrizations(model[5], "weight")  # leaves an approximate layer
    assert type(model[5]) is ApproxLinear


def test_parametrized_layers_train_at_half_ratio():
    torch.manual_seed(1)
    x, target = torch.randn(16, 3, 6, 6), torch.randint(5, (16,))
    model = parametrized_net()
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=x[:2])
    assert plan.compute_reduction > 0.3
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits the 16 examples (exact training: 1.6 -> 0.15)


def conv1d_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), HFConv1D(nf=10, nx=12), nn.ReLU(), HFConv1D(nf=4, nx=10))


def test_hf_conv1d_is_sampled_as_a_linear_of_its_input_features():
    x, target = torch.randn(3, 5, 6), torch.randn(3, 5, 4)
    exact, model = conv1d_net(), conv1d_net()
    plan = approximate_(model, rules_from_dicts([{"match": "0", "exact": True}, {}], TOPK_ALL), example_input=x, batch_size=3)
    rows = {row.name: row for row in plan.rows}
    assert [(rows[name].type, rows[name].n, rows[name].policy) for name in ("2", "4")] == [("Linear", 12, "topk"), ("Linear", 10, "topk")]
    assert rows["2"].note.startswith("transformers Conv1D")
    assert isinstance(model[2], HFConv1D) and model[2].weight is not None and sorted(model.state_dict()) == sorted(exact.state_dict())
    # MACs: 15 rows x 12 x 10 per product, all three (its input needs a gradient)
    assert rows["2"].exact_macs == ProductMACs(15 * 12 * 10, 15 * 12 * 10, 15 * 12 * 10)
    model.train()
    torch.testing.assert_close(model(x), exact(x))  # ratio 1.0: every pair kept
    F.mse_loss(model(x), target).backward()
    F.mse_loss(exact(x), target).backward()
    for (name, gradient), (_, expected) in zip(model.named_parameters(), exact.named_parameters()):
        torch.testing.assert_close(gradient.grad, expected.grad, msg=name)


def test_hf_conv1d_at_half_ratio_keeps_half_its_input_features_and_meters_them():
    model, x = conv1d_net(), torch.randn(3, 5, 6)
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=x)
    assert {row.name: row.k for row in plan.rows} == {"0": 3, "2": 6, "4": 5}
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    model(x).sum().backward()
    assert meter.entries["2"].exact.forward == 15 * 12 * 10 and meter.entries["2"].actual.forward == 15 * 6 * 10
    assert model[2].weight.grad.abs().sum(dim=1).count_nonzero() == 6  # the kept input features: rows of W (nx, nf)
    assert plan.approx_macs == meter.actual.total and plan.exact_macs == meter.exact.total
    surgery_exact = conv1d_net()
    approximate_(surgery_exact, rules_from_dicts([{"exact": True}], TOPK_HALF))
    assert type(surgery_exact[2]) is HFConv1D  # made exact again: its own class


def test_a_rule_left_without_a_layer_says_an_earlier_rule_took_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # its one layer is both first and last
    with pytest.raises(ValueError) as error:
        approximate_(model, rules_from_dicts([{"position": "first", "exact": True}, {"position": "last", "exact": True}], TOPK_HALF))
    assert str(error.value) == ("layer rule #2 (position='last' exact) matches no layer: every layer it selects took an "
                                "earlier rule first (1 took rule #1); layers: 1")


FUNCTIONAL_NET = ("model=custom", "model._target_=byo_nets.FunctionalNet", "+model.in_channels=${dataset_info:in_channels}",
                  "+model.num_classes=${dataset_info:num_classes}", "dataset=digits", "dataset.batch_size=200", "layers=all")


def test_a_run_that_samples_nothing_says_why_and_reports_zero(run_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="approxtrain"):
        results = Trainer(run_cfg(*FUNCTIONAL_NET, "trainer.max_steps=2"), tmp_path / "run").fit()
    assert results.compute_reduction == 0.0 and results.planned_compute_reduction == 0.0
    assert read_results(tmp_path / "run")["compute_reduction"] == 0.0  # a number, not null
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("nothing is sampled although the layer rules ask for it: hidden, head: never called as a module")
    assert warnings[0].endswith("compute_reduction is 0.0")


def test_a_rule_on_a_model_without_layers_names_the_cause():
    model = nn.Sequential(nn.ReLU())
    model.weight = nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"matches no layer; layers: none \(the model has no nn.Linear/nn.Conv2d"):
        approximate_(model, rules_from_dicts([{}], TOPK_HALF))


OUTPUT_NET = ("model=custom", "model._target_=byo_nets.OutputNet", "+model.in_channels=${dataset_info:in_channels}",
              "+model.num_classes=${dataset_info:num_classes}", "dataset=digits", "dataset.batch_size=200", "trainer.max_steps=2")


@pytest.mark.parametrize("returns", ["dataclass", "dict", "tuple"])
def test_a_transformers_style_output_trains_and_evaluates(run_cfg, tmp_path, returns):
    results = Trainer(run_cfg(*OUTPUT_NET, f"+model.returns={returns}"), tmp_path / "run").fit()
    assert results.steps == 2 and 0 <= results.final_metric <= 1 and results.compute_reduction > 0


def test_an_output_without_logits_is_one_line_naming_its_type(run_cfg, tmp_path):
    with pytest.raises(TypeError) as error:
        Trainer(run_cfg(*OUTPUT_NET, "+model.returns=str"), tmp_path / "run").fit()
    assert str(error.value) == ("the model returned a str; allowed: a Tensor of logits, or an output holding one "
                                "as .logits, ['logits'] or [0] (a transformers ModelOutput, a dict, a tuple)")
    assert read_results(tmp_path / "run")["error"].endswith(str(error.value))
