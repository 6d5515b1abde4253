"""torch.compile traces approximate models: no graph break for fixed-k samplers, and
Bernoulli (a data-dependent number of pairs) breaks only at its selection."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from approxtrain import ComputeMeter, LayerRule, SamplingConfig, approximate_, attach_meter
from approxtrain.data import DatasetInfo
from approxtrain.models import build_model

MNIST = DatasetInfo("mnist", "image", 1, (28, 28), 10)


def _cnn(policy: str) -> tuple[torch.nn.Module, ComputeMeter]:
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "dropout": 0.0}, MNIST)  # no dropout: eager and compiled draw different masks
    approximate_(model, [LayerRule("conv1", exact=True), LayerRule(sampling=SamplingConfig(policy, ratio=0.5))])
    meter = ComputeMeter()
    attach_meter(model, meter)
    return model.train(), meter


@pytest.mark.parametrize("policy", ["topk", "nps", "uniform"])
def test_fixed_k_samplers_trace_without_graph_breaks(policy: str) -> None:
    model, _ = _cnn(policy)
    dynamo.reset()
    explanation = dynamo.explain(lambda x: model(x).sum())(torch.randn(2, 1, 28, 28))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def test_bernoulli_breaks_only_at_its_selection() -> None:
    model, _ = _cnn("bernoulli")
    dynamo.reset()
    explanation = dynamo.explain(lambda x: model(x).sum())(torch.randn(2, 1, 28, 28))
    reasons = {str(b.reason).splitlines()[0] for b in explanation.break_reasons}
    assert explanation.graph_break_count > 0
    assert all("disable" in reason for reason in reasons), reasons


@pytest.mark.slow
def test_compiled_training_step_counts_the_same_macs() -> None:
    eager, eager_meter = _cnn("topk")
    compiled, compiled_meter = _cnn("topk")
    step = torch.compile(compiled)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for _model, run in ((eager, eager), (compiled, step)):
        torch.nn.functional.cross_entropy(run(x), y).backward()
    assert compiled_meter.actual == eager_meter.actual and compiled_meter.exact == eager_meter.exact
    torch.testing.assert_close(compiled.fc1.weight.grad, eager.fc1.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_steps_do_not_recompile() -> None:
    # the meter's running totals change every step; they must not be guarded on
    model, meter = _cnn("topk")
    dynamo.reset()
    step = torch.compile(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(step(x), y).backward()
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            torch.nn.functional.cross_entropy(step(x), y).backward()
    assert meter.entries["conv2"].calls == 4
