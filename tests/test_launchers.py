"""Sweeps under every Hydra launcher (basic, joblib, submitit_local), end to end in subprocesses with
the default ``trainer.num_workers`` (loader worker processes inside the launcher's jobs): jobs run in
this process (basic), in worker processes (joblib) or as separate submitit jobs, yet every job records
its results.json, the launching process prints the comparison table, and a failed job fails the
sweep's exit code."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from joblib import Parallel, delayed
from torch.utils.data import TensorDataset

from approxtrain.data.order import ShuffledLoader
from approxtrain.run.rundir import checkpoint_path
from approxtrain.run.schema import read_results
from conftest import approxtrain_command

TINY = ("model=mlp", "dataset=digits", "logger=none", "trainer.max_steps=2", "trainer.device=cpu")  # num_workers: the default
LAUNCHERS = {
    "basic": (),
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    "submitit_local": ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"),
}
EXTRA = {"joblib": "joblib", "submitit_local": "slurm"}  # the extra that brings each launcher


def each_launcher() -> list:
    return [pytest.param(name, marks=[pytest.mark.extra(EXTRA[name])] if name in EXTRA else []) for name in LAUNCHERS]


def run_sweep(cli, tmp_path, launcher: str, *overrides: str):
    sweep_dir = tmp_path / "sweep"
    process = cli("-m", *LAUNCHERS[launcher], *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}", timeout=300)
    assert "Traceback" not in process.stdout + process.stderr, process.stderr[-3000:]
    return process, sweep_dir


def _load_in_a_job(num_workers: int) -> tuple[str | None, list[list[int]]]:
    loader = ShuffledLoader(TensorDataset(torch.arange(6)), batch_size=3, seed=0, num_workers=num_workers, pin_memory=False)
    loader.set_epoch(1)
    return multiprocessing.get_start_method(allow_none=True), [batch.tolist() for (batch,) in loader]


def test_loader_workers_start_inside_a_joblib_job():
    """joblib's loky workers run a job with the start method ``loky``, which starts only loky's own
    processes (a plain one fails with "'Process' object has no attribute 'env'"): the workers fork."""
    (method, in_job), = Parallel(n_jobs=2, backend="loky")(delayed(_load_in_a_job)(2) for _ in range(1))
    assert method == "loky" and in_job == _load_in_a_job(0)[1]
    from approxtrain.data.order import worker_context

    assert worker_context() is None  # here: the process's own start method, torch's default


def test_the_default_loads_with_worker_processes(compose_cfg):
    assert compose_cfg("model=mlp").trainer.num_workers > 0  # (else the sweeps below would not test them)


@pytest.mark.parametrize("launcher", each_launcher())
def test_sweep_under_launcher_completes_with_table(launcher, cli, tmp_path):
    process, sweep_dir = run_sweep(cli, tmp_path, launcher, "sampler=exact,topk")
    assert process.returncode == 0, process.stderr[-3000:]
    results = [read_results(sweep_dir / job) for job in ("0", "1")]
    assert [r["status"] for r in results] == ["finished", "finished"], [r.get("error") for r in results]
    assert {r["sampler"] for r in results} == {"exact", "topk"}
    table = process.stdout[process.stdout.rfind("mlp / digits"):]
    assert "exact" in table and "topk" in table and "baseline" in table, process.stdout[-3000:]


@pytest.mark.parametrize("launcher", [param for param in each_launcher() if param.values[0] != "basic"])
def test_sweep_under_launcher_with_a_failed_job_exits_nonzero(launcher, cli, tmp_path):
    process, sweep_dir = run_sweep(cli, tmp_path, launcher, "layers=paper,gates")  # gates: rules no MLP layer matches
    assert process.returncode == 1, process.stderr[-3000:]
    assert read_results(sweep_dir / "0")["status"] == "finished"
    failed = read_results(sweep_dir / "1")
    assert failed["status"] == "failed" and failed["error"].startswith("layer rule #1 (match='rnn.*.gates'")
    lines = process.stderr.strip().splitlines()
    summary = lines.index("approxtrain: 1 job(s) failed:")
    assert lines[summary + 1].strip().startswith("job 1 (") and lines[summary + 1].endswith(failed["error"])
    assert "mlp / digits" in process.stdout  # the table is printed before the exit


def _descendants(pid: int) -> set[tuple[int, str]]:
    """The live processes under ``pid`` (``(pid, start time)``, which tells a reused pid apart)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append((int(entry), stat[19]))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def _alive(process: tuple[int, str]) -> bool:
    try:
        stat = Path(f"/proc/{process[0]}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and stat[19] == process[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [param for param in each_launcher() if param.values[0] != "basic"])
def test_sigterm_to_the_sweep_stops_its_jobs_with_a_summary(launcher, tmp_path):
    """SIGTERM to ``approxtrain -m``: its running jobs checkpoint and record ``interrupted``, a job not
    started yet does not start, the summary lists every job, the exit is 143 and no process of the
    sweep outlives it (joblib's loky workers included)."""
    sweep_dir = tmp_path / "sweep"
    command = [*approxtrain_command(), "-m", *LAUNCHERS[launcher], "model=mlp", "dataset=digits", "logger=none",
               "dataset.batch_size=50", "trainer.epochs=500", "trainer.device=cpu", "trainer.num_workers=0",
               "sampler=exact,topk,nps", f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            training = [job for job in sweep_dir.glob("*") if (read_results(job) or {}).get("epochs")]
            if len(training) >= 2:
                break
            time.sleep(0.3)
        assert process.poll() is None, process.communicate()[1][-3000:]
        processes = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=150)
    finally:  # a failed check leaves no process of the sweep behind
        for pid, _ in _descendants(process.pid) if process.poll() is None else ():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    summary = lines.index("approxtrain: the sweep was stopped by SIGTERM; its jobs:")
    listed = lines[summary + 1:]
    jobs = sorted(path.name for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())
    for job in jobs:
        results = read_results(sweep_dir / job)
        line = next((line for line in listed if line.strip().split(": ", 1)[-1].startswith(f"job {job} (")), None)
        assert line is not None, f"job {job} missing from the summary:\n" + "\n".join(listed)
        if results is None:
            assert line.strip().startswith("not started:"), line
            continue
        assert results["status"] in ("interrupted", "finished"), results
        assert line.strip().startswith(f"{results['status']}:"), line
        assert checkpoint_path(sweep_dir / job).exists()
    interrupted = [job for job in jobs if (read_results(sweep_dir / job) or {}).get("status") == "interrupted"]
    assert len(interrupted) >= 2, stderr[-3000:]
    assert not (sweep_dir / ".stop").exists()
    time.sleep(1.0)
    assert not [child for child in processes if _alive(child)], f"outlived the sweep: {processes}"
