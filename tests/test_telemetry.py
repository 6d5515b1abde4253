"""Approximation telemetry: exact at ratio 1, an explicit computation with top-k, and what a run records."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from approxtrain import approximate_
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import Trainer
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import LayerRule
from approxtrain.telemetry import Telemetry
from byo_nets import HFConv1D

DIGITS = ("model=mlp", "dataset=digits", "dataset.batch_size=200")


def _measured(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> list:
    telemetry = Telemetry(model, every=1)
    probe = telemetry.watch()
    (model(x) * weights).sum().backward()
    return telemetry.measure(probe, lambda: (model(x) * weights).sum(), step=0)


def _model(layer: str) -> nn.Module:
    torch.manual_seed(0)
    if layer == "conv":
        return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 2, 3))
    if layer == "weight_norm":  # a parametrized weight: its gradient is weight_g's and weight_v's
        return nn.Sequential(parametrizations.weight_norm(nn.Linear(12, 6)), nn.Tanh(), nn.Linear(6, 3))
    if layer == "conv1d":  # transformers' Conv1D: its weight stored (n, out)
        return nn.Sequential(HFConv1D(nf=6, nx=12), nn.Tanh(), nn.Linear(6, 3))
    return nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("layer", ["linear", "conv", "weight_norm", "conv1d"])
def test_ratio_one_measures_no_error(layer):
    model = _model(layer)
    approximate_(model, [LayerRule(sampling=SamplingConfig("nps", 1.0, replacement=False))])
    x = torch.randn(2, 3, 6, 6) if layer == "conv" else torch.randn(4, 12)
    rows = _measured(model, x, torch.randn_like(model(x)))
    assert len(rows) == 2
    for row in rows:
        assert row.k == row.n and row.forward_error < 1e-6 and row.discarded_share == 0.0
        assert row.grad_cosine == pytest.approx(1.0, abs=1e-6)


def test_topk_matches_an_explicit_computation():
    torch.manual_seed(1)
    layer = nn.Linear(10, 4)
    model = nn.Sequential(layer)
    approximate_(model, [LayerRule(sampling=SamplingConfig("topk", 0.4, scale=False))])
    x, weights = torch.randn(7, 10), torch.randn(7, 4)
    w = model[0].weight.detach().clone()
    (row,) = _measured(model, x, weights)
    scores = x.norm(dim=0) * w.norm(dim=0)
    keep = torch.topk(scores, 4).indices
    exact = x @ w.T
    sampled = x[:, keep] @ w[:, keep].T
    assert row.k == 4 and row.forward_error == pytest.approx(((sampled - exact).norm() / exact.norm()).item(), rel=1e-5)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    assert row.discarded_share == pytest.approx((scores[dropped].sum() / scores.sum()).item(), rel=1e-5)
    exact_grad = weights.T @ x  # d(sum(Y * weights))/dW
    approx_grad = torch.zeros_like(exact_grad)
    approx_grad[:, keep] = exact_grad[:, keep]
    cosine = (approx_grad * exact_grad).sum() / (approx_grad.norm() * exact_grad.norm())
    assert row.grad_cosine == pytest.approx(cosine.item(), rel=1e-5)


def test_telemetry_run_records_rows_and_trains_the_same(run_cfg, tmp_path):
    results = {}
    for every in (0, 3):
        cfg = run_cfg(*DIGITS, "ratio=0.3", "sampler=nps", f"trainer.telemetry_every={every}", "trainer.epochs=2",
                      "model.hidden=64")
        results[every] = Trainer(cfg, tmp_path / str(every)).fit()
    on = read_results(tmp_path / "3")
    assert [epoch["train_loss"] for epoch in on["epochs"]] == [epoch["train_loss"] for epoch in results[0].epochs]
    assert on["compute_reduction"] == results[0].compute_reduction  # the exact pass is not counted
    assert results[0].telemetry == []
    steps = sorted({row["step"] for row in on["telemetry"]})
    # digits: 1437 - 144 held out for validation -> 7 batches of 200 per epoch, 14 steps (0..13)
    assert steps == [0, 3, 6, 9, 12] and {row["layer"] for row in on["telemetry"]} == {"fc1", "fc2", "fc3"}
    for row in on["telemetry"]:
        assert 0 < row["forward_error"] and 0 < row["discarded_share"] < 1 and -1 <= row["grad_cosine"] <= 1


def _written_run(run_dir, seed: int, *overrides: str, telemetry: bool = False):
    from approxtrain.run.schema import Results
    from conftest import write_run_dir

    rows = [{"step": step, "epoch": 1, "layer": layer, "k": 10, "n": 64, "forward_error": 0.1 * step + (layer == "fc2"),
             "discarded_share": 0.2, "grad_cosine": 0.9} for step in (0, 5) for layer in ("fc1", "fc2")] if telemetry else []
    results = Results(model="mlp", dataset="digits", sampler="topk", ratio=0.3, seed=seed, layers_rule_set="paper",
                      status="finished", best_metric=0.9, final_metric=0.9, compute_reduction=0.5, telemetry=rows)
    return write_run_dir(run_dir, results, *overrides)


def test_compare_keeps_schedules_apart_and_plots_layer_error(tmp_path):
    from approxtrain.compare import build_rows, collect_runs
    from approxtrain.compare.formatting import row_label
    from approxtrain.compare.report import write_report

    for seed in (0, 1):
        _written_run(tmp_path / f"constant{seed}", seed)
        _written_run(tmp_path / f"linear{seed}", seed, "schedule=linear", telemetry=True)
    (table,) = build_rows(collect_runs([tmp_path])[0])
    labels = sorted(row_label(row) for row in table.rows)
    assert len(table.rows) == 2 and [len(row.runs) for row in table.rows] == [2, 2]
    assert labels == ["topk 0.3 paper schedule=constant", "topk 0.3 paper schedule=linear"]
    paths = write_report([table], [], tmp_path / "report")
    assert paths["layer_error.png"].stat().st_size > 0
    assert "layer_error.png" in paths["report.md"].read_text()
