"""Ratio schedules and the adaptive controller: what k each layer keeps, when, and what the meter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from approxtrain import ComputeMeter, approximate_, attach_meter
from approxtrain.config import ConfigError, validate
from approxtrain.modules import ApproxLinear
from approxtrain.run.trainer import Trainer
from approxtrain.sampling import SamplingConfig
from approxtrain.schedule import AdaptiveRatios, RatioSchedule, budget_k, discarded_share, pair_scores
from approxtrain.surgery import LayerRule

DIGITS = ("model=mlp", "dataset=digits", "dataset.batch_size=200")


@pytest.mark.parametrize(("schedule", "weights"), [
    (RatioSchedule("warmup", exact_first=2), [0, 0, 1, 1, 1, 1]),
    (RatioSchedule("linear", anneal=4), [0, 0.25, 0.5, 0.75, 1, 1]),
    (RatioSchedule("linear", exact_first=1, anneal=2, exact_last=1), [0, 0, 0.5, 1, 1, 0]),
    (RatioSchedule("cosine", anneal=2), [0, 0.5, 1, 1, 1, 1]),
    (RatioSchedule("step", anneal=4, stages=2), [0.5, 0.5, 1, 1, 1, 1]),
    (RatioSchedule("constant", exact_last=2), [1, 1, 1, 1, 0, 0]),
])
def test_schedule_weight_per_epoch(schedule, weights):
    assert [schedule.weight(epoch, 0.5, 6) for epoch in range(1, 7)] == pytest.approx(weights)


def test_step_interval_moves_within_an_epoch():
    schedule = RatioSchedule("linear", anneal=2, interval="step")
    assert [schedule.weight(1, fraction, 4) for fraction in (0, 0.5)] + [schedule.weight(2, 0.5, 4)] == [0, 0.25, 0.75]


def _hand_reduction(k1: int, k2: int, k3: int) -> float:
    """Digits MLP 64-500-500-10: fc1 runs forward and weight-gradient products (its input needs no
    gradient), fc2 and fc3 all three; each product costs rows * k * out MACs."""
    actual = 2 * 500 * k1 + 3 * 500 * k2 + 3 * 10 * k3
    exact = 2 * 500 * 64 + 3 * 500 * 500 + 3 * 10 * 500
    return 1 - actual / exact


def test_meter_counts_the_scheduled_mix_of_ratios(run_cfg, run_dir):
    # linear from exact to 0.5 over 2 epochs: ratios 1.0, 0.75, 0.5 (k exact multiples: no rounding question)
    cfg = run_cfg(*DIGITS, "trainer.epochs=3", "ratio=0.5", "schedule=linear", "schedule.anneal=2")
    results = Trainer(cfg, run_dir).fit()
    per_epoch = [0.0, _hand_reduction(48, 375, 375), _hand_reduction(32, 250, 250)]
    assert [epoch["ratio"] for epoch in results.epochs] == [1.0, 0.75, 0.5]
    assert [epoch["compute_reduction"] for epoch in results.epochs] == pytest.approx(per_epoch, rel=1e-12, abs=1e-12)
    assert [epoch["layer_k"]["fc2"] for epoch in results.epochs] == [500, 375, 250]
    # every epoch trains on the same examples, so the run's reduction is the epochs' mean
    assert results.compute_reduction == pytest.approx(sum(per_epoch) / 3, rel=1e-12)


def test_budget_k_on_scores_with_a_known_tail():
    scores = torch.tensor([1.0, 8.0, 1.0, 2.0, 4.0])  # sorted 8 4 2 1 1, total 16
    assert budget_k(scores, 2 / 16) == 3  # drops 1 + 1 = 12.5 %
    assert budget_k(scores, 0.12) == 4
    assert budget_k(scores, 0.0) == 5
    assert budget_k(scores, 0.99) == 1
    assert budget_k(scores, 0.12, min_k=5) == 5 and budget_k(scores, 2 / 16, align_k=2) == 4
    assert discarded_share(scores, 3) == pytest.approx(2 / 16)
    geometric = 0.5 ** torch.arange(40.0)  # the tail after k pairs holds 2^-k of the mass (nearly)
    assert [budget_k(geometric, 2.0 ** -j * 1.001) for j in (1, 3, 7)] == [1, 3, 7]


def _adaptive_mlp(every: int, interval: str) -> tuple[nn.Sequential, AdaptiveRatios]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    approximate_(model, [LayerRule(sampling=SamplingConfig("topk", 0.5))])
    return model, AdaptiveRatios(model, budget=0.2, every=every, interval=interval)


def test_adaptive_k_stays_constant_between_decisions():
    model, control = _adaptive_mlp(every=3, interval="step")
    first = model[0]
    seen = []
    for step in range(7):
        x = torch.randn(16, 64) * torch.linspace(0.1, 1 + step, 64) ** (step % 3 + 1)  # the tail changes every step
        control.before_step(1, step, step)
        decides = control.due(1, step, step) or step == 0
        model(x).sum().backward()
        seen.append(first.sampling.fixed_k)
        if decides:
            assert seen[-1] == budget_k(pair_scores(first, x), 0.2)
    assert control.decisions == 3  # steps 0, 3 and 6
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and len(set(seen)) > 1


def test_adaptive_per_epoch_decides_at_the_epochs_it_should():
    model, control = _adaptive_mlp(every=2, interval="epoch")
    decided = []
    for epoch in (1, 2, 3):
        for batch in range(3):
            before = control.decisions
            control.before_step(epoch, batch, 3 * (epoch - 1) + batch)
            model(torch.randn(4, 64))
            decided.append(control.decisions > before)
    assert decided == [True, False, False, False, False, False, True, False, False]


def test_a_chosen_k_is_exact_in_layer_plan_and_meter():
    layer = ApproxLinear(784, 10, sampling=SamplingConfig("topk", 0.4, fixed_k=313))
    assert "k=313/784" in repr(layer)
    model = nn.Sequential(layer)
    plan = approximate_(model, [LayerRule(sampling=SamplingConfig("topk", 0.4, fixed_k=313))], example_input=torch.randn(5, 784))
    assert plan.rows[0].k == 313
    meter = ComputeMeter()
    attach_meter(model, meter)
    model.train()
    model(torch.randn(5, 784)).sum().backward()
    assert meter.actual.forward == 5 * 313 * 10 and meter.actual.total == plan.rows[0].approx_macs.total


@pytest.mark.parametrize(("override", "message"), [
    ("schedule.budget=1.5", "schedule.budget=1.5 is invalid; allowed: a number in [0, 1), e.g. 0.1"),
    ("schedule.interval=week", "schedule.interval='week' is invalid; allowed: epoch, step"),
    ("+schedule.anneal=3", "schedule.anneal is not a field of schedule=adaptive; allowed: name, budget, every, interval"),
])
def test_bad_schedule_values_are_one_line(run_cfg, override, message):
    with pytest.raises(ConfigError) as error:
        validate(run_cfg("schedule=adaptive", override))
    assert str(error.value) == message


def test_resumed_adaptive_run_keeps_its_decided_k(run_cfg, tmp_path):
    """Decisions every 5 steps (digits at batch 200: 8 steps an epoch): the run stopped after epoch 1
    resumes inside a decision period, with the k decided at step 5, as the uninterrupted run did."""
    common = (*DIGITS, "sampler=topk", "schedule=adaptive", "schedule.budget=0.2", "schedule.interval=step",
              "schedule.every=5")
    whole = Trainer(run_cfg(*common, "trainer.epochs=2"), tmp_path / "whole").fit()
    Trainer(run_cfg(*common, "trainer.epochs=1"), tmp_path / "split").fit()
    resumed = Trainer(run_cfg(*common, "trainer.epochs=2", f"resume={tmp_path / 'split'}"), tmp_path / "split").fit()
    assert [e["train_loss"] for e in resumed.epochs] == [e["train_loss"] for e in whole.epochs]
    assert [e["layer_k"] for e in resumed.epochs] == [e["layer_k"] for e in whole.epochs]
    assert resumed.compute_reduction == whole.compute_reduction
