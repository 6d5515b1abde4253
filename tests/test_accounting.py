"""Compute accounting: hand-computed MACs in the Plan and the ComputeMeter, Bernoulli's
varying count, and the compute reductions of Adelman & Silberstein (2018)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from approxtrain.accounting import (
    ComputeMeter,
    LayerCompute,
    LayerShape,
    ProductMACs,
    compute_reduction,
    lstm_macs,
    sampled_macs,
)
from approxtrain.data import DatasetInfo
from approxtrain.models import build_model
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import LayerRule, approximate_, attach_meter, exact_layer_macs, rules_from_dicts
from conftest import compose_config, to_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# --------------------------------------------------------------------------- records


def test_product_macs_and_layer_compute():
    macs = ProductMACs(1, 2, 3) + ProductMACs(10, 20, 30)
    assert macs == ProductMACs(11, 22, 33) and macs.total == 66
    layer = LayerCompute()
    layer.add("forward", 10, 4)
    layer.add("weight_grad", 10, 5)
    layer.add("forward", 10, 4)
    assert layer.exact == ProductMACs(20, 0, 10) and layer.actual == ProductMACs(8, 0, 5)
    layer.calls = 3
    layer.reset()
    assert layer.exact.total == layer.actual.total == layer.calls == 0


def test_compute_reduction_and_meter_summary():
    assert compute_reduction(0, 0) == 0.0
    assert compute_reduction(200, 50) == 0.75
    meter = ComputeMeter()
    meter.entry("a").add("forward", 100, 40)
    meter.entry("b").add("input_grad", 100, 100)
    assert meter.entry("a") is meter.entries["a"]
    assert meter.exact == ProductMACs(100, 100, 0) and meter.actual == ProductMACs(40, 100, 0)
    assert meter.compute_reduction == 0.3
    summary = meter.summary()
    assert summary["a"] == {"exact_forward": 100, "actual_forward": 40, "exact_input_grad": 0, "actual_input_grad": 0,
                            "exact_weight_grad": 0, "actual_weight_grad": 0, "compute_reduction": 0.6}
    meter.reset()
    assert meter.exact.total == 0 and meter.compute_reduction == 0.0


def test_layer_compute_records_one_call_of_the_products_it_ran():
    layer = LayerCompute()
    layer.record(ProductMACs(10, 0, 10), ProductMACs(4, 0, 5))
    layer.record(ProductMACs(10, 10, 0), ProductMACs(4, 3, 0))
    assert (layer.exact, layer.actual, layer.calls) == (ProductMACs(20, 10, 10), ProductMACs(8, 3, 5), 2)


def test_mac_formulas():
    exact = 50 * 784 * 500
    assert LayerShape.linear(50, 784, 500).macs() == ProductMACs(exact, exact, exact) and exact == 19_600_000
    # forward k of the pairs; input grad k_b of the outputs; weight grad k_w of the rows
    assert LayerShape.linear(50, 784, 500).macs(300, 20, 10) == ProductMACs(50 * 300 * 500, 50 * 300 * 20, 10 * 300 * 500)
    assert LayerShape.linear(50, 784, 500).macs(300, input_grad=False) == ProductMACs(50 * 300 * 500, 0, 50 * 300 * 500)
    conv = LayerShape.conv2d(2, 8, 16, (3, 3), (3, 3))
    assert conv.macs(weight_grad=False) == ProductMACs(2 * 9 * 16 * 8 * 9, 2 * 9 * 16 * 8 * 9, 0)
    assert conv.macs(4, 5, 1) == ProductMACs(2 * 4 * 16 * 81, 2 * 4 * 5 * 81, 1 * 4 * 16 * 81)
    assert LayerShape.conv2d(2, 16, 16, (3, 3), (4, 4), groups=16).forward_macs() == 2 * 16 * 16 * 1 * 9
    # the sampled counts take k_b and k_w from the config: bwd 0.25 of 16 outputs, wu 0.5 of 2 samples
    sampling = SamplingConfig("topk", ratio=0.5, bwd_ratio=0.25, wu_ratio=0.5)
    assert sampled_macs(conv, sampling, input_grad=False) == (conv.macs(input_grad=False), ProductMACs(
        2 * 4 * 16 * 81, 0, 1 * 4 * 16 * 81))
    assert sampled_macs(conv, sampling, k=3)[1] == conv.macs(3, 4, 1)
    assert lstm_macs(35, 650, 650) == 35 * 4 * 650 * 1300
    lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)
    macs = exact_layer_macs(lstm, (3, 5, 8), (3, 5, 6), input_grad=False)
    rows = 15
    forward = rows * 4 * 6 * (8 + 6) + rows * 4 * 6 * (6 + 6)
    # layer 0's input part needs no gradient; its recurrent part and all of layer 1 do
    assert macs == ProductMACs(forward, rows * 4 * 6 * 6 + rows * 4 * 6 * 12, forward)


# --------------------------------------------------------------------------- hand-computed small model


def small_model() -> nn.Sequential:
    """conv1 3->8 3x3 pad 1 on 8x8 (out 8x8) -> conv2 8->16 3x3 stride 2 (out 3x3) -> Flatten -> fc 144->10."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(144, 10))


BATCH = 4
# Per product, at batch 4 (names "0" = conv1, "2" = conv2, "5" = fc):
#   conv1 exact:  4 * (8*8 out) * 8 out-ch * 3 in-ch * 9     = 55,296  (no input-gradient product: first layer)
#   conv2 exact:  4 * (3*3 out) * 16 out-ch * 8 in-ch * 9    = 41,472  per product
#   fc exact:     4 rows * 144 * 10                          = 5,760   per product
EXACT = {"0": ProductMACs(55_296, 0, 55_296), "2": ProductMACs(41_472, 41_472, 41_472),
         "5": ProductMACs(5_760, 5_760, 5_760)}
# top-k 50%: conv1 keeps k = round(1.5) = 2 of 3 channels, conv2 4 of 8, fc 72 of 144:
#   conv1: 4 * 64 * 8 * 2 * 9 = 36,864;  conv2: 4 * 9 * 16 * 4 * 9 = 20,736;  fc: 4 * 72 * 10 = 2,880
TOPK_HALF = {"0": ProductMACs(36_864, 0, 36_864), "2": ProductMACs(20_736, 20_736, 20_736),
             "5": ProductMACs(2_880, 2_880, 2_880)}
# plus backward sampling on conv2 (bwd 0.25: 4 of 16 output channels; wu 0.5: 2 of 4 samples)
# and fc (bwd 0.5: 5 of 10 outputs; wu 0.5: 2 of 4 rows):
#   conv2 input grad: 4 samples * 4 in * 4 out * (3*3*9) = 5,184;  weight grad: 2 * 4 * 16 * 81 = 10,368
#   fc input grad:    4 rows * 72 * 5 = 1,440;                     weight grad: 2 * 72 * 10 = 1,440
BACKWARD_SAMPLED = {"0": ProductMACs(36_864, 0, 36_864), "2": ProductMACs(20_736, 5_184, 10_368),
                    "5": ProductMACs(2_880, 1_440, 1_440)}


def small_rules(backward: bool) -> list[LayerRule]:
    if not backward:
        return [LayerRule(sampling=SamplingConfig("topk", ratio=0.5))]
    return [LayerRule(match="0", sampling=SamplingConfig("topk", ratio=0.5)),
            LayerRule(match="2", sampling=SamplingConfig("topk", ratio=0.5, bwd_ratio=0.25, wu_ratio=0.5)),
            LayerRule(match="5", sampling=SamplingConfig("topk", ratio=0.5, bwd_ratio=0.5, wu_ratio=0.5))]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


@pytest.mark.parametrize("backward", [False, True], ids=["forward-sampling", "backward-sampling"])
def test_small_model_macs_by_hand_in_plan_and_meter(backward):
    approx = BACKWARD_SAMPLED if backward else TOPK_HALF
    model = small_model()
    inputs = torch.randn(BATCH, 3, 8, 8)
    # the plan traces a batch of 2 and scales to the training batch
    plan = approximate_(model, small_rules(backward), example_input=inputs[:2], batch_size=BATCH)
    rows = {row.name: row for row in plan.rows}
    assert [row.k for row in plan.rows] == [2, 4, 72]
    for name in EXACT:
        assert rows[name].exact_macs == EXACT[name], name
        assert rows[name].approx_macs == approx[name], name
    exact_total = sum(m.total for m in EXACT.values())
    approx_total = sum(m.total for m in approx.values())
    assert plan.exact_macs == exact_total and plan.approx_macs == approx_total
    assert plan.compute_reduction == pytest.approx(1 - approx_total / exact_total)

    meter = ComputeMeter()
    attach_meter(model, meter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_step(model, optimizer, inputs, torch.arange(BATCH))
    for name in EXACT:
        assert meter.entries[name].exact == EXACT[name], name
        assert meter.entries[name].actual == approx[name], name
        assert meter.entries[name].calls == 1
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction)
    # evaluation is exact and not counted; a second step doubles the totals
    model.eval()
    with torch.no_grad():
        model(inputs)
    train_step(model, optimizer, inputs, torch.arange(BATCH))
    assert meter.exact.total == 2 * exact_total and meter.actual.total == 2 * approx_total


def test_exact_layers_are_counted_by_hooks_in_training_only():
    model = small_model()
    plan = approximate_(model, [LayerRule(match="5", sampling=SamplingConfig("topk", ratio=0.5))],
                        example_input=torch.randn(2, 3, 8, 8), batch_size=BATCH)
    meter = ComputeMeter()
    handles = attach_meter(model, meter)
    assert len(handles) == 2  # the two exact convolutions
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_step(model, optimizer, torch.randn(BATCH, 3, 8, 8), torch.arange(BATCH))
    assert meter.entries["0"].exact == meter.entries["0"].actual == EXACT["0"]
    assert meter.entries["2"].actual == EXACT["2"]
    assert meter.entries["5"].actual == TOPK_HALF["5"]
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction)
    # a training-mode forward without grad counts the forward products only
    meter.reset()
    with torch.no_grad():
        model(torch.randn(BATCH, 3, 8, 8))
    assert meter.entries["0"].actual == ProductMACs(55_296, 0, 0)
    assert meter.entries["2"].actual == ProductMACs(41_472, 0, 0)
    assert meter.entries["5"].actual == ProductMACs(2_880, 0, 0)
    # eval mode is not counted; removed hooks count nothing
    meter.reset()
    model.eval()
    model(torch.randn(BATCH, 3, 8, 8))
    assert meter.exact.total == 0
    for handle in handles:
        handle.remove()
    model.train()
    with torch.no_grad():
        model(torch.randn(BATCH, 3, 8, 8))
    assert meter.entries["0"].exact.total == 0 and meter.entries["5"].exact.forward == 5_760


def test_frozen_weights_have_no_weight_gradient_product():
    model = small_model()
    model[5].weight.requires_grad_(False)
    model[5].bias.requires_grad_(False)
    model[0].weight.requires_grad_(False)
    plan = approximate_(model, [LayerRule(match="5", sampling=SamplingConfig("topk", ratio=0.5))],
                        example_input=torch.randn(BATCH, 3, 8, 8))
    rows = {row.name: row for row in plan.rows}
    assert rows["5"].exact_macs == ProductMACs(5_760, 5_760, 0) and rows["5"].approx_macs == ProductMACs(2_880, 2_880, 0)
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    model(torch.randn(BATCH, 3, 8, 8)).sum().backward()
    assert meter.entries["5"].actual == ProductMACs(2_880, 2_880, 0)
    assert meter.entries["0"].actual == ProductMACs(55_296, 0, 0)


def test_bernoulli_meter_varies_between_steps_and_averages_to_the_plan():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = small_model()
        generator = torch.Generator().manual_seed(0)
        # conv1 (3 channels) stays exact: with so few pairs Bernoulli's "keep one when none is
        # drawn" fallback (probability up to (1/3)^3) would shift the mean count above k.
        plan = approximate_(model, [LayerRule(match="0", exact=True),
                                    LayerRule(sampling=SamplingConfig("bernoulli", ratio=0.5))], generator=generator,
                            example_input=torch.randn(2, 3, 8, 8), batch_size=BATCH)
        assert plan.approx_macs == EXACT["0"].total + TOPK_HALF["2"].total + TOPK_HALF["5"].total
        meter = ComputeMeter()
        attach_meter(model, meter)
        inputs = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        totals = []
        for _ in range(200):
            meter.reset()
            model.train()
            model(inputs).sum().backward()
            assert meter.exact.total == plan.exact_macs
            totals.append(float(meter.actual.total))
    finally:
        torch.set_num_threads(threads)
    counts = torch.tensor(totals)
    assert len(set(totals)) > 5  # the number kept varies from step to step
    z = (counts.mean() - plan.approx_macs) / (counts.std() / math.sqrt(len(totals)))
    assert abs(z) < 4.5, f"z = {z:.2f}"
    assert abs(counts.mean() / plan.approx_macs - 1) < 0.03


# --------------------------------------------------------------------------- plan = meter, every paper model


def paper_rules(model: str, layers: str) -> list[LayerRule]:
    """The rules of ``layers=<layers>`` for ``model`` (``paper``: its config's ``paper_rules``),
    sampling forward and both backward products."""
    if layers == "paper":  # composed: a model config may take its rules from model/paper_rules
        items = to_run_config(compose_config(f"model={model}"))["model"]["paper_rules"]
    else:
        items = yaml.safe_load((CONFIGS / "layers" / f"{layers}.yaml").read_text())["rules"]
    return rules_from_dicts(items, SamplingConfig("topk", ratio=0.5, bwd_ratio=0.5, wu_ratio=0.5))


SMALL_IMAGES = DatasetInfo("small", "image", in_channels=3, image_size=(16, 16), num_classes=10)
SMALL_TEXT = DatasetInfo("synthetic", "text", vocab_size=50, metric="perplexity")
PAPER_MODELS = {  # small variants of each paper model, with the paper's layer choice
    "mlp": (SMALL_IMAGES, {"hidden": 24}, "paper"),
    "cnn": (SMALL_IMAGES, {"hidden": 32}, "paper"),
    "wrn": (SMALL_IMAGES, {"depth": 10, "widen_factor": 2}, "paper"),
    "resnet50": (SMALL_IMAGES, {}, "paper"),
    "lstm": (SMALL_TEXT, {"hidden": 16, "layers": 2}, "paper"),
    "lstm-gates": (SMALL_TEXT, {"hidden": 16, "layers": 2, "cell": "unrolled"}, "gates"),
    "torchvision": (SMALL_IMAGES, {"arch": "resnet18"}, "paper"),
    "transformer": (SMALL_TEXT, {"hidden": 16, "layers": 2, "heads": 2, "feedforward": 32}, "paper"),
    "custom": (SMALL_IMAGES, {"_target_": "byo_nets.SmallConvNet", "in_channels": "${dataset.in_channels}",
                              "num_classes": "${dataset.num_classes}"}, "paper"),
}


def test_every_paper_model_has_a_plan_and_meter_case():
    assert {case.split("-")[0] for case in PAPER_MODELS} == {path.stem for path in (CONFIGS / "model").glob("*.yaml")}


@pytest.mark.parametrize("case", list(PAPER_MODELS))
def test_plan_and_meter_count_the_same_macs_for_every_paper_model(case):
    info, options, layers = PAPER_MODELS[case]
    name = case.split("-")[0]
    torch.manual_seed(0)
    model = build_model({"name": name, **options}, info)
    generator = torch.Generator().manual_seed(0)
    if info.kind == "image":
        inputs = torch.randn(4, 3, 16, 16, generator=generator)
    else:
        inputs = torch.randint(0, 50, (4, 6), generator=generator)
    # the plan traces 2 samples and scales to the training batch of 4
    plan = approximate_(model, paper_rules(name, layers), example_input=inputs[:2], batch_size=4)
    assert any(row.policy == "topk" for row in plan.rows)
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    if hasattr(model, "reset_state"):
        model.reset_state()
    model(inputs).float().pow(2).mean().backward()
    for row in plan.rows:
        if row.name not in meter.entries:  # a row of products surgery leaves out of the MACs (attention's, an embedding)
            assert row.exact_macs.total == row.approx_macs.total == 0 and row.policy == "exact", row.name
            continue
        assert (meter.entries[row.name].exact, meter.entries[row.name].actual) == (row.exact_macs, row.approx_macs), row.name
    assert meter.actual.total == plan.approx_macs < plan.exact_macs == meter.exact.total


# --------------------------------------------------------------------------- paper reductions


class PaperMLP(nn.Module):
    """MNIST MLP (supplementary material): 784-500-500-10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 500)
        self.fc2 = nn.Linear(500, 500)
        self.fc3 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class MnistDeep(nn.Module):
    """TensorFlow's mnist_deep: conv 5x5x32 + pool, conv 5x5x64 + pool, fc 3136->1024, dropout, fc 1024->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(3136, 1024)
        self.fc2 = nn.Linear(1024, 10)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(self.dropout(F.relu(self.fc1(x.flatten(1)))))


def plan_and_meter(model: nn.Module, rules: list[LayerRule], batch: int, steps: int = 2) -> tuple[float, float]:
    """The plan's compute reduction at ``batch`` and the meter's after ``steps`` real Adam steps."""
    plan = approximate_(model, rules, example_input=torch.randn(2, 1, 28, 28), batch_size=batch)
    meter = ComputeMeter()
    attach_meter(model, meter)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        train_step(model, optimizer, torch.randn(batch, 1, 28, 28, generator=generator),
                   torch.randint(0, 10, (batch,), generator=generator))
    return plan.compute_reduction, meter.compute_reduction


PAPER_CASES = {
    # Table 2 (Table 1: 79%): top-k 40% forward, 5% backprop with at least 10 samples per product
    "mlp-fwd40-bwd5": (PaperMLP, [LayerRule(sampling=SamplingConfig("topk", ratio=0.4, bwd_ratio=0.05, wu_ratio=0.05,
                                                                    bwd_min_k=10, wu_min_k=10))], 0.80, 0.015),
    # Sec. 3.3: 40% of the column-row pairs, forward only
    "mlp-fwd40": (PaperMLP, [LayerRule(sampling=SamplingConfig("topk", ratio=0.4))], 0.60, 0.015),
    # Sec. 4.1: "about 68%" with 30% of the channels, the first convolution exact
    "cnn-fwd30": (MnistDeep, [LayerRule(match="conv1", exact=True), LayerRule(sampling=SamplingConfig("topk", ratio=0.3))],
                  0.68, 0.02),
    # Table 2: 40% forward, 20% backprop (at least 10 samples)
    "cnn-fwd40-bwd20": (MnistDeep, [LayerRule(match="conv1", exact=True),
                                    LayerRule(sampling=SamplingConfig("topk", ratio=0.4, bwd_ratio=0.2, wu_ratio=0.2,
                                                                      bwd_min_k=10, wu_min_k=10))], 0.78, 0.015),
}


@pytest.mark.parametrize("case", list(PAPER_CASES))
def test_paper_compute_reduction_mlp_and_cnn(case):
    build, rules, expected, tolerance = PAPER_CASES[case]
    torch.manual_seed(0)
    planned, metered = plan_and_meter(build(), rules, batch=50)
    assert planned == pytest.approx(expected, abs=tolerance), f"{case}: plan {planned:.2%} vs paper {expected:.0%}"
    # top-k keeps a fixed k: the meter after real steps counts exactly what the plan predicts
    assert metered == pytest.approx(planned, abs=1e-12)


def test_mlp_reduction_by_hand():
    # fc1 (first layer, no input grad): fwd 50*314*500, wgrad 10*314*500 (wu: max(10, round(2.5)) rows)
    # fc2: fwd 50*200*500, input grad 50*200*25 (bwd 5% of 500), wgrad 10*200*500
    # fc3: fwd 50*200*10,  input grad 50*200*10 (min 10 of 10),  wgrad 10*200*10
    approx = 50 * 314 * 500 + 10 * 314 * 500 + 50 * 200 * 500 + 50 * 200 * 25 + 10 * 200 * 500 \
        + 50 * 200 * 10 + 50 * 200 * 10 + 10 * 200 * 10
    exact = 2 * 50 * 784 * 500 + 3 * 50 * 500 * 500 + 3 * 50 * 500 * 10
    torch.manual_seed(0)
    plan = approximate_(PaperMLP(), PAPER_CASES["mlp-fwd40-bwd5"][1], example_input=torch.randn(2, 784), batch_size=50)
    assert (plan.exact_macs, plan.approx_macs) == (exact, approx)


@pytest.fixture(scope="module")
def wrn():
    from approxtrain.data import DatasetInfo
    from approxtrain.models import build_model

    info = DatasetInfo(name="cifar100", kind="image", in_channels=3, image_size=(32, 32), num_classes=100)
    torch.manual_seed(0)
    return build_model({"name": "wrn"}, info)


def wrn_plan(model: nn.Module, rules: list[LayerRule]):
    """Surgery on WRN-28-10 with MACs traced at batch 1 and given for the paper's batch of 128."""
    return approximate_(model, rules, example_input=torch.randn(1, 3, 32, 32), batch_size=128)


def test_paper_compute_reduction_wrn_all_but_the_input_convolution(wrn):
    # Sec. 4.1: all convolutions but the input layer at 50%, fc exact -> 50%
    plan = wrn_plan(wrn, [LayerRule(match="conv1", exact=True),
                          LayerRule(type="Conv2d", sampling=SamplingConfig("topk", ratio=0.5))])
    rows = {row.name: row for row in plan.rows}
    assert rows["conv1"].policy == "exact" and rows["fc"].policy == "exact" and rows["fc"].note == "no rule"
    assert rows["block1.0.conv1"].k == 8 and rows["block3.3.conv2"].k == 320
    assert sum(row.policy == "topk" for row in plan.rows) == 27  # 24 convolutions + 3 shortcuts
    assert plan.compute_reduction == pytest.approx(0.50, abs=0.015)
    # the input convolution and fc amount to ~0.01% of the MACs (Sec. 4.1)
    small = rows["conv1"].exact_macs.total + rows["fc"].exact_macs.total
    assert small / plan.exact_macs < 0.001


def test_paper_compute_reduction_wrn_320_and_640_filter_layers(wrn):
    # Sec. 4.1: only the layers with 320 and 640 filters at 50% -> 33%
    sampling = SamplingConfig("topk", ratio=0.5)
    plan = wrn_plan(wrn, [LayerRule(match="block2.*", type="Conv2d", sampling=sampling),
                          LayerRule(match="block3.*", type="Conv2d", sampling=sampling)])
    sampled = [row for row in plan.rows if row.policy == "topk"]
    assert len(sampled) == 18
    assert {wrn.get_submodule(row.name).out_channels for row in sampled} == {320, 640}
    assert plan.compute_reduction == pytest.approx(0.33, abs=0.015)


def test_paper_compute_reduction_lstm_decoder_only():
    from approxtrain.data import DatasetInfo
    from approxtrain.models import build_model

    info = DatasetInfo(name="ptb", kind="text", vocab_size=10000, metric="perplexity")
    torch.manual_seed(0)
    model = build_model({"name": "lstm"}, info)
    assert isinstance(model.rnn, nn.LSTM) and model.rnn.hidden_size == 650 and model.rnn.num_layers == 2
    # Sec. 3.4: top-k 50% on W2 (the decoder) only -> 24%
    plan = approximate_(model, [LayerRule(match="decoder", sampling=SamplingConfig("topk", ratio=0.5))],
                        example_input=torch.randint(0, 10000, (2, 35)), batch_size=20)
    rows = {row.name: row for row in plan.rows}
    assert rows["decoder"].k == 325 and rows["rnn"].type == "LSTM" and rows["rnn"].policy == "exact"
    # the decoder is about half of the MACs
    assert rows["decoder"].exact_macs.total / plan.exact_macs == pytest.approx(0.49, abs=0.01)
    assert plan.compute_reduction == pytest.approx(0.24, abs=0.015)
    # and a real training step counts what the plan predicts (every product here scales
    # linearly with the batch, so a batch of 4 has the reduction of a batch of 20)
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    model.reset_state()
    inputs = torch.randint(0, 10000, (4, 35))
    F.cross_entropy(model(inputs).flatten(0, 1), inputs.flatten()).backward()
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction, abs=1e-12)


def test_unrolled_lstm_gate_layers_are_counted_at_every_time_step():
    from approxtrain.data import DatasetInfo
    from approxtrain.models import build_model

    info = DatasetInfo(name="ptb", kind="text", vocab_size=50, metric="perplexity")
    torch.manual_seed(0)
    model = build_model({"name": "lstm", "hidden": 16, "layers": 2, "cell": "unrolled"}, info)
    sampling = SamplingConfig("topk", ratio=0.5, wu_ratio=0.5)
    plan = approximate_(model, [LayerRule(match="rnn.*.gates", sampling=sampling)],
                        example_input=torch.randint(0, 50, (2, 7)), batch_size=4)
    rows = {row.name: row for row in plan.rows}
    # [x_t, h_{t-1}] (32 features) -> 4 * 16 gates, called once per step: 7 steps of 4 rows
    gates = rows["rnn.0.gates"]
    assert (gates.n, gates.k) == (32, 16)
    assert gates.exact_macs == ProductMACs(lstm_macs(28, 16, 16), lstm_macs(28, 16, 16), lstm_macs(28, 16, 16))
    # per step: forward 4 * 16 * 64, input grad the same, weight grad on wu_k(4) = 2 rows
    assert gates.approx_macs == ProductMACs(7 * 4 * 16 * 64, 7 * 4 * 16 * 64, 7 * 2 * 16 * 64)
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    model.reset_state()
    inputs = torch.randint(0, 50, (4, 7))
    F.cross_entropy(model(inputs).flatten(0, 1), inputs.flatten()).backward()
    assert meter.entries["rnn.0.gates"].calls == 7
    assert meter.entries["rnn.1.gates"].actual == rows["rnn.1.gates"].approx_macs
    assert meter.exact.total == plan.exact_macs and meter.actual.total == plan.approx_macs
