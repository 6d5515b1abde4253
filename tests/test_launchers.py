"""Sweeps under Hydra's parallel launchers, end to end in subprocesses: jobs run in worker
processes (joblib) or separate submitit jobs, yet every job records its results.json, the
launching process prints the comparison table, and a failed job fails the sweep's exit code."""

from __future__ import annotations

import pytest

from approxtrain.run.schema import read_results

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TINY = ("model=mlp", "dataset=digits", "logger=none", "trainer.max_steps=2", "trainer.num_workers=0", "trainer.device=cpu")
LAUNCHERS = {
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    "submitit_local": ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"),
}


def run_sweep(cli, tmp_path, launcher: str, *overrides: str):
    sweep_dir = tmp_path / "sweep"
    process = cli("-m", *LAUNCHERS[launcher], *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}", timeout=300)
    assert "Traceback" not in process.stdout + process.stderr, process.stderr[-3000:]
    return process, sweep_dir


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sweep_under_launcher_completes_with_table(launcher, cli, tmp_path):
    process, sweep_dir = run_sweep(cli, tmp_path, launcher, "sampler=exact,topk")
    assert process.returncode == 0, process.stderr[-3000:]
    results = [read_results(sweep_dir / job) for job in ("0", "1")]
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert {r["sampler"] for r in results} == {"exact", "topk"}
    table = process.stdout[process.stdout.rfind("mlp / digits"):]
    assert "exact" in table and "topk" in table and "baseline" in table, process.stdout[-3000:]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sweep_under_launcher_with_a_failed_job_exits_nonzero(launcher, cli, tmp_path):
    process, sweep_dir = run_sweep(cli, tmp_path, launcher, "ratio=0.5,1.5")
    assert process.returncode == 1, process.stderr[-3000:]
    assert read_results(sweep_dir / "0")["status"] == "finished"
    failed = read_results(sweep_dir / "1")
    assert failed["status"] == "failed" and failed["error"].startswith("ratio=1.5 is invalid")
    lines = process.stderr.strip().splitlines()
    summary = lines.index("approxtrain: 1 job(s) failed:")
    assert lines[summary + 1].strip().startswith("job 1 (") and lines[summary + 1].endswith(failed["error"])
    assert "mlp / digits" in process.stdout  # the table is printed before the exit
