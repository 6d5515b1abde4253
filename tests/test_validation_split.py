"""The validation split end to end: a run chooses its best epoch on validation and reports the
test metric there; without validation data it says it chose on test; the compare tool reports
``test_metric_at_best`` and still reads runs written before validation splits."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from approxtrain.compare import build_rows, collect_runs
from approxtrain.run.schema import TEST, VALIDATION, EpochRecord, Results, read_results, results_path
from approxtrain.run.trainer import train
from conftest import write_run_dir

SHORT = ("model=mlp", "dataset=digits", "sampler=topk", "ratio=0.3", "trainer.epochs=3")


def first_best(epochs: list[dict], key: str) -> dict:
    return max(epochs, key=lambda epoch: (epoch[key], -epoch["epoch"]))  # accuracy: higher, the first on ties


def test_best_epoch_is_chosen_on_validation_and_reports_test(run_cfg, run_dir):
    train(run_cfg(*SHORT), run_dir)
    results = read_results(run_dir)
    epochs = results["epochs"]
    assert len(epochs) == 3 and all(0 <= epoch["val_metric"] <= 1 for epoch in epochs)
    best = first_best(epochs, "val_metric")
    assert results["selected_on"] == VALIDATION and results["best_epoch"] == best["epoch"]
    assert results["best_metric"] == best["val_metric"]  # best_metric: the best validation metric
    assert results["test_metric_at_best"] == best["test_metric"]  # the number to report
    assert results["final_metric"] == epochs[-1]["test_metric"]


def test_without_validation_data_the_best_epoch_is_chosen_on_test(run_cfg, run_dir):
    train(run_cfg(*SHORT, "dataset.val_fraction=0"), run_dir)
    results = read_results(run_dir)
    assert all(epoch["val_metric"] is None for epoch in results["epochs"])
    best = first_best(results["epochs"], "test_metric")
    assert results["selected_on"] == TEST and results["best_epoch"] == best["epoch"]
    assert results["best_metric"] == results["test_metric_at_best"] == best["test_metric"]


def results_of(sampler: str, seed: int, val: list[float], test: list[float]) -> Results:
    epochs = [asdict(EpochRecord(epoch=e, step=10 * e, train_loss=0.1, test_metric=t, compute_reduction=0.5, time_s=1.0,
                                 step_time_s=0.01, lr=0.1, val_metric=v)) for e, (v, t) in enumerate(zip(val, test), 1)]
    best = max(range(len(val)), key=lambda i: (val[i], -i))
    return Results(model="mlp", dataset="digits", sampler=sampler, ratio=0.3, seed=seed, layers_rule_set="paper",
                   status="finished", best_metric=val[best], best_epoch=best + 1, test_metric_at_best=test[best],
                   selected_on=VALIDATION, final_metric=test[-1], compute_reduction=0.5, epochs=epochs, step_time_s=0.01)


def test_compare_reports_the_test_metric_at_the_best_epoch_and_reads_old_runs(tmp_path):
    write_run_dir(tmp_path / "new", results_of("topk", 0, val=[0.80, 0.90, 0.85], test=[0.70, 0.81, 0.95]),
                  "trainer.epochs=3")
    old = write_run_dir(tmp_path / "old", results_of("nps", 0, val=[0.80, 0.90, 0.85], test=[0.70, 0.81, 0.95]),
                        "trainer.epochs=3")
    legacy = json.loads(results_path(old).read_text())  # as the previous version wrote it: no val keys
    for key in ("best_epoch", "test_metric_at_best", "selected_on"):
        legacy.pop(key)
    for epoch in legacy["epochs"]:
        epoch.pop("val_metric")
    legacy["best_metric"] = 0.95  # then: the best test metric
    results_path(old).write_text(json.dumps(legacy))
    runs = {run.sampler: run for run in collect_runs([tmp_path])[0]}
    assert runs["topk"].best_metric == pytest.approx(0.81) and runs["topk"].notes == []  # test at epoch 2, not 0.90 or 0.95
    assert runs["nps"].best_metric == pytest.approx(0.95)
    assert runs["nps"].notes == ["best epoch chosen on the test metric (written before validation splits): its metric is optimistic"]
    (table,) = build_rows(list(runs.values()))
    assert {row.first.sampler: row.best_metric.mean for row in table.rows} == pytest.approx({"topk": 0.81, "nps": 0.95})
