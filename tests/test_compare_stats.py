"""The compare tool's statistics: intervals of the difference to exact (against scipy and by
hand), direction-aware verdicts on constructed run dirs, and the too-few-seeds warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
from test_compare import LSTM, row_for, run_cli, write_run

from approxtrain.compare import build_rows, collect_runs
from approxtrain.compare.stats import (
    BETTER,
    BOOTSTRAP,
    WELCH,
    WITHIN_NOISE,
    WORSE,
    Interval,
    bootstrap_interval,
    difference_interval,
    verdict,
    welch_interval,
)


@pytest.mark.parametrize(("values", "reference"), [
    ([0.91, 0.93, 0.90], [0.95, 0.94, 0.955, 0.945]),
    ([120.0, 131.0, 125.5, 128.0, 122.0], [118.0, 119.5, 117.0]),
    ([1.0, 2.0, 3.5], [0.2, 0.5, 0.1, 0.9]),
])
def test_welch_interval_is_scipys(values: list[float], reference: list[float]) -> None:
    expected = scipy_stats.ttest_ind(values, reference, equal_var=False).confidence_interval(0.95)
    interval = welch_interval(values, reference)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), rel=1e-9)
    assert interval.method == WELCH


def test_welch_interval_by_hand() -> None:
    # a = 1, 2, 3 (mean 2, var 1); b = 0, 0, 0 (var 0): se = sqrt(1/3), df = 2, t(0.975, 2) = 4.302653
    interval = welch_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 * (1 / 3) ** 0.5
    assert (interval.low, interval.high) == pytest.approx((2 - half, 2 + half), rel=1e-9)


def test_identical_seeds_give_a_point_interval() -> None:
    interval = welch_interval([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert (interval.low, interval.high) == pytest.approx((0.1, 0.1))


def test_bootstrap_over_two_seeds_spans_the_extremes() -> None:
    # Two values a side: each resampled mean is min, max (1/4 each) or the mean (1/2); the 2.5 %
    # and 97.5 % points of the difference fall on min a - max b and max a - min b (1/16 each).
    interval = bootstrap_interval([0.86, 0.90], [0.93, 0.95])
    assert (interval.low, interval.high) == pytest.approx((0.86 - 0.95, 0.90 - 0.93))
    assert interval.method == BOOTSTRAP
    assert bootstrap_interval([0.86, 0.90], [0.93, 0.95]) == interval  # a fixed seed: reproducible


def test_bootstrap_matches_scipys_percentile_bootstrap() -> None:
    values, reference = [0.91, 0.95], [0.90, 0.93, 0.92, 0.97]
    mine = bootstrap_interval(values, reference, resamples=20_000)
    theirs = scipy_stats.bootstrap((values, reference), lambda a, b: a.mean() - b.mean(), method="percentile",
                                   n_resamples=20_000, rng=1, vectorized=False).confidence_interval
    assert (mine.low, mine.high) == pytest.approx((theirs.low, theirs.high), abs=0.004)


def test_the_method_follows_the_seeds() -> None:
    assert difference_interval([0.9], [0.8, 0.85, 0.82]) is None
    assert difference_interval([0.9, 0.91, 0.92], [0.8]) is None
    assert difference_interval([0.9, 0.91], [0.8, 0.85, 0.82]).method == BOOTSTRAP
    assert difference_interval([0.9, 0.91, 0.92], [0.8, 0.85, 0.82]).method == WELCH


@pytest.mark.parametrize(("interval", "higher_is_better", "expected"), [
    (Interval(0.01, 0.03, WELCH), True, BETTER),
    (Interval(-0.03, -0.01, WELCH), True, WORSE),
    (Interval(-0.01, 0.03, WELCH), True, WITHIN_NOISE),
    (Interval(0.0, 0.03, WELCH), True, WITHIN_NOISE),  # 0 inside (on the edge)
    (Interval(2.0, 5.0, WELCH), False, WORSE),  # perplexity up
    (Interval(-5.0, -2.0, WELCH), False, BETTER),  # perplexity down
    (None, True, None),
])
def test_verdict_is_direction_aware(interval: Interval | None, higher_is_better: bool, expected: str | None) -> None:
    assert verdict(interval, higher_is_better) == expected


def write_seeds(root: Path, name: str, values: list[float], **spec) -> None:
    for seed, value in enumerate(values):
        write_run(root / f"{name}{seed}", seed=seed, best=value, **spec)


def test_verdicts_on_run_dirs(tmp_path: Path) -> None:
    exact = [0.950, 0.945, 0.955]
    write_seeds(tmp_path, "exact", exact, sampler="exact")
    write_seeds(tmp_path, "topk", [0.900, 0.910, 0.905], sampler="topk", reduction=0.5)  # far behind
    write_seeds(tmp_path, "nps", [0.960, 0.930, 0.950], sampler="nps", reduction=0.5)  # inside the noise
    write_seeds(tmp_path, "uniform", [0.97, 0.975, 0.98], sampler="uniform", reduction=0.5)  # ahead
    write_seeds(tmp_path, "lstm_exact", [120.0, 121.0, 119.0], sampler="exact", **LSTM)
    write_seeds(tmp_path, "lstm_topk", [110.0, 111.0, 109.5], sampler="topk", reduction=0.5, **LSTM)
    tables = {table.model: table for table in build_rows(collect_runs([tmp_path])[0])}
    mlp, lstm = tables["mlp"], tables["lstm"]
    topk = row_for(mlp, "topk").as_record()
    expected = scipy_stats.ttest_ind([0.900, 0.910, 0.905], exact, equal_var=False).confidence_interval(0.95)
    assert (topk["delta_low"], topk["delta_high"]) == pytest.approx((expected.low, expected.high))
    assert topk["interval_method"] == WELCH and topk["verdict"] == WORSE
    assert row_for(mlp, "nps").verdict == WITHIN_NOISE
    assert row_for(mlp, "uniform").verdict == BETTER
    assert row_for(lstm, "topk").verdict == BETTER  # lower perplexity
    assert row_for(mlp, "exact").verdict is None and row_for(mlp, "exact").interval is None
    assert mlp.warnings == [] and lstm.warnings == []


def test_cli_shows_intervals_verdicts_and_warns_about_few_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_seeds(tmp_path, "exact", [0.95, 0.93], sampler="exact")
    write_seeds(tmp_path, "topk", [0.90, 0.86], sampler="topk", reduction=0.5)
    write_seeds(tmp_path, "nps", [0.90], sampler="nps", reduction=0.5)
    code, out, _ = run_cli([str(tmp_path), "--no-report"], capsys)
    assert code == 0
    (topk_line,) = [line for line in out.splitlines() if line.strip().startswith("topk")]
    assert "[-0.0900, -0.0300] bootstrap" in topk_line and "worse" in topk_line
    warnings = [line for line in out.splitlines() if line.startswith("  warning: ")]
    assert len(warnings) == 3  # exact and topk with 2 seeds, nps with 1
    assert any("1 seed, fewer than 3: no interval or verdict" in line for line in warnings)
    code, out, _ = run_cli([str(tmp_path), "--no-report", "--min-seeds", "2"], capsys)
    assert [line for line in out.splitlines() if line.startswith("  warning: ")] == [
        "  warning: sampler=nps [finished]: 1 seed, fewer than 2: no interval or verdict"]
    code, out, err = run_cli([str(tmp_path), "--format", "json"], capsys)
    (table,) = json.loads(out)["tables"]
    assert len(table["warnings"]) == 3 and err.count("warning: mlp/digits: ") == 3


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_min_seeds_is_one_line_exit_2(tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "e0", sampler="exact")
    code, out, err = run_cli([str(tmp_path), "--min-seeds", value], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"approxtrain-compare: error: argument --min-seeds: {value!r} is invalid; allowed: an integer >= 1"]
