"""approxtrain-compare on real runs made by the approxtrain CLI (exact + two samplers, two seeds)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from approxtrain.run.rundir import write_results
from approxtrain.run.schema import RESULTS_FILE, RUNNING, Results, read_results, results_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 3 samplers x 2 seeds sweep on digits (about 10 s on 2 cores)."""
    root = tmp_path_factory.mktemp("compare_real")
    sweep_dir = root / "sweep"
    command = [sys.executable, "-m", "approxtrain.cli.train", "-m", "model=mlp", "dataset=digits",
               "sampler=exact,topk,nps", "ratio=0.3", "seed=0,1", "logger=none", "trainer.epochs=2",
               "trainer.num_workers=0", "trainer.checkpoint=false", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(sweep_dir.glob(f"*/{RESULTS_FILE}"))) == 6
    return sweep_dir


def _compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "approxtrain.cli.compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_rows_baselines_delta_speedup_and_seed_aggregation(sweep: Path) -> None:
    done = _compare(str(sweep), "--format", "json", "--no-report", cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (table,) = report["tables"]
    rows = {row["sampler"]: row for row in table["rows"]}
    assert set(rows) == {"exact", "topk", "nps"}
    runs = {}
    for run_dir in sweep.iterdir():
        results = read_results(run_dir)
        if results is not None:
            runs.setdefault(results["sampler"], []).append(results)
    assert all(len(group) == 2 for group in runs.values())
    # the table reports each run's test_metric_at_best (best_metric is the validation metric since 766001d)
    baseline_metric = statistics.mean(r["test_metric_at_best"] for r in runs["exact"])
    baseline_step = statistics.mean(r["step_time_s"] for r in runs["exact"])
    for sampler in ("topk", "nps"):
        row, group = rows[sampler], runs[sampler]
        assert row["n"] == 2 and sorted(row["seeds"]) == [0, 1]
        assert row["best_metric"] == pytest.approx(statistics.mean(r["test_metric_at_best"] for r in group))
        assert row["best_metric_std"] == pytest.approx(statistics.stdev(r["test_metric_at_best"] for r in group))
        assert row["compute_reduction"] == pytest.approx(statistics.mean(r["compute_reduction"] for r in group))
        assert 0.6 < row["compute_reduction"] < 0.8  # 30 % of the pairs kept in every layer
        assert row["baseline_metric"] == pytest.approx(baseline_metric)
        assert row["delta"] == pytest.approx(row["best_metric"] - baseline_metric)
        step = statistics.mean(r["step_time_s"] for r in group)
        assert row["speedup"] == pytest.approx(baseline_step / step, rel=1e-6)
        assert row["status"] == "finished"
    assert rows["exact"]["delta"] == pytest.approx(0.0)


def test_report_folder_pngs_and_csv(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = _compare(str(sweep), "--out", str(out), cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    for name in ("pareto.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert "Δ" in (out / "report.md").read_text() or "vs exact" in (out / "report.md").read_text()
    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(rows) == 6 and {row["sampler"] for row in rows} == {"exact", "topk", "nps"}


def test_broken_runs_are_reported_and_the_others_still_appear(sweep: Path, tmp_path: Path) -> None:
    tree = tmp_path / "outputs"
    shutil.copytree(sweep, tree / "sweep")
    jobs = sorted(path for path in (tree / "sweep").iterdir() if results_path(path).exists())
    missing, corrupt, running = (shutil.copytree(jobs[0], tree / name) for name in ("missing", "corrupt", "running"))
    results_path(missing).unlink()
    results_path(corrupt).write_text('{"status": "finished", "model": ')
    write_results(running, dataclasses.replace(Results.from_dict(read_results(running)), status=RUNNING))
    done = _compare(str(tree), "--format", "json", "--no-report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    problems = " ".join(str(problem) for problem in report["problems"])
    assert "missing" in problems and "corrupt" in problems
    statuses = [row["status"] for table in report["tables"] for row in table["rows"]]
    assert "running" in statuses
    assert sum(row["n"] for table in report["tables"] for row in table["rows"] if row["status"] == "finished") == 6
