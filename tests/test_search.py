"""Trade-off search: the app's configurable return value (``objective``) and the Optuna presets
(``search=pareto``, ``search=smallest_ratio``), end to end where hydra-optuna-sweeper is installed."""

from __future__ import annotations

import math

import pytest
import yaml

from approxtrain.cli.objective import objective_names, objective_value
from approxtrain.cli.train import composition_error
from approxtrain.run.rundir import write_results
from approxtrain.run.schema import FINISHED, PERPLEXITY, Results, read_results

TINY = ("model=mlp", "dataset=digits", "logger=none", "trainer.max_steps=2", "trainer.num_workers=0", "trainer.device=cpu")


def finished(best: float | None = 0.9, metric: str = "accuracy", reduction: float = 0.5) -> Results:
    return Results(model="mlp", dataset="digits", sampler="topk", ratio=0.3, seed=0, layers_rule_set="paper", metric_name=metric,
                   status=FINISHED, best_metric=best, final_metric=best, compute_reduction=reduction)


# ---------------------------------------------------------------------------------------------- objective


def test_one_objective_is_a_number_a_list_is_a_list():
    results = finished()
    assert objective_value({"objective": "best_metric"}, results) == 0.9
    assert objective_value({"objective": ["best_metric", "compute_reduction"]}, results) == [0.9, 0.5]
    assert objective_value({}, results) == 0.9  # the default
    assert math.isnan(objective_value({"objective": "best_metric"}, finished(best=None)))  # Optuna: a failed trial


@pytest.mark.parametrize("objective", ["accuracy", ["best_metric", "speed"], [], 3])
def test_a_bad_objective_is_one_line(objective):
    with pytest.raises(ValueError, match=r"^objective=.* is invalid; allowed: one of best_metric, final_metric, compute_reduction"):
        objective_names({"objective": objective})


@pytest.mark.parametrize(("best", "expected"), [(0.95, 0.3), (0.94, 0.3), (0.90, 1.04)])
def test_ratio_within_margin_is_the_ratio_when_the_metric_is_kept(best, expected):
    cfg = {"objective": "ratio_within_margin", "ratio": 0.3, "search": {"baseline": 0.96, "margin": 0.02}}
    assert objective_value(cfg, finished(best=best)) == pytest.approx(expected)


def test_ratio_within_margin_follows_the_metric_direction_and_reads_a_baseline_run(tmp_path):
    write_results(tmp_path, Results(model="lstm", dataset="ptb", sampler="exact", ratio=1.0, seed=0, layers_rule_set="paper",
                                    metric_name=PERPLEXITY, status=FINISHED, best_metric=100.0))
    cfg = {"objective": "ratio_within_margin", "ratio": 0.3, "search": {"baseline": str(tmp_path), "margin": 2.0}}
    assert objective_value(cfg, finished(best=101.5, metric=PERPLEXITY)) == 0.3
    assert objective_value(cfg, finished(best=103.0, metric=PERPLEXITY)) == pytest.approx(2.0)


@pytest.mark.parametrize(("search", "names"), [
    ({"baseline": "???", "margin": 0.01}, "search.baseline='???' is invalid"),
    ({"baseline": "/nowhere", "margin": 0.01}, "search.baseline='/nowhere' holds no finished run with a best metric (no results.json)"),
    ({"baseline": 0.9, "margin": -1}, "search.margin=-1 is invalid"),
    (None, "search.baseline=None is invalid"),
])
def test_a_bad_search_key_is_one_line(search, names):
    with pytest.raises(ValueError) as error:
        objective_names({"objective": "ratio_within_margin", "search": search})
    assert str(error.value).startswith(names) and "\n" not in str(error.value)


def test_a_bad_objective_is_refused_before_anything_runs():
    assert composition_error([*TINY, "objective=speed"]).startswith("objective='speed' is invalid")
    assert composition_error([*TINY, "objective=[best_metric,compute_reduction]"]) is None


# ---------------------------------------------------------------------------------------------- Optuna presets


@pytest.mark.extra("optuna")
def test_smallest_ratio_without_a_baseline_is_refused_before_the_search():
    error = composition_error(["-m", "search=smallest_ratio", *TINY])
    assert error.startswith("search.baseline='???' is invalid; allowed: exact training's best metric")


@pytest.mark.extra("optuna")
def test_a_two_trial_pareto_search_returns_two_objectives(cli, tmp_path):
    """Each trial returns [best_metric, compute_reduction]; the Pareto front holds them."""
    sweep_dir = tmp_path / "sweep"
    process = cli("-m", "search=pareto", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep_dir}", timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    trials = [read_results(sweep_dir / job) for job in ("0", "1")]
    assert [trial["status"] for trial in trials] == ["finished", "finished"]
    returned = {(trial["best_metric"], trial["compute_reduction"]) for trial in trials}
    solutions = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(len(solution["values"]) == 2 for solution in solutions)
    assert {tuple(solution["values"]) for solution in solutions} <= returned
    assert all(set(solution["params"]) == {"ratio", "sampler"} for solution in solutions)


@pytest.mark.extra("optuna")
def test_a_failed_trial_fails_the_search_in_one_line(cli, tmp_path):
    process = cli("-m", "search=pareto", "hydra.sweeper.n_trials=2", *TINY, "layers=gates", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  timeout=300)  # gates: rules no MLP layer matches, found when the trial builds its model
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith(
        "approxtrain: error: job 0 failed, which ends the Optuna search: layer rule #1 (match='rnn.*.gates'")


@pytest.mark.extra("optuna")
def test_a_bad_value_for_every_trial_is_refused_before_the_search(cli, tmp_path):
    process = cli("-m", "search=pareto", "hydra.sweeper.n_trials=2", *TINY, "trainer.epochs=0", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert process.returncode == 2 and not (tmp_path / "sweep").exists()
    assert process.stderr.strip().splitlines()[-1] == "approxtrain: error: trainer.epochs=0 is invalid; allowed: an integer in [1, 1000000]"
