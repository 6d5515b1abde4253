"""The installed ``approxtrain`` script end to end, in subprocesses: a run, sweeps, failures, W&B offline, resume."""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from approxtrain.run.checkpoint import load_checkpoint
from approxtrain.run.schema import read_results
from conftest import RESULT_KEYS, read_wandb_records

# A short real run: the MLP on scikit-learn's digits, one epoch, no W&B.
SMALL = ("model=mlp", "dataset=digits", "trainer.epochs=1", "trainer.num_workers=0", "trainer.device=cpu")


def assert_clean_failure(process, *names: str) -> str:
    """Non-zero exit; stderr ends with one ``approxtrain: error:`` line naming ``names``; no traceback anywhere."""
    assert process.returncode != 0, process.stdout[-2000:]
    for stream in (process.stdout, process.stderr):
        assert "Traceback" not in stream, stream[-3000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("approxtrain: error: "), process.stderr[-3000:]
    for name in names:
        assert name in last, last
    return last.removeprefix("approxtrain: error: ")


def assert_finished(run_dir: Path) -> dict:
    results = read_results(run_dir)
    assert results is not None, f"no results.json in {run_dir}"
    assert results["status"] == "finished", results.get("error")
    assert all(key in results for key in RESULT_KEYS)
    return results


def wandb_run_file(run_dir: Path) -> Path:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run in {run_dir / 'wandb'}, found {runs}"
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    return files[0]


def wandb_contents(path: Path) -> tuple[dict, dict, list]:
    """(run config, final summary, exit records) of an offline W&B run file."""
    config: dict = {}
    summary: dict = {}
    exits = []
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
        elif kind == "exit":
            exits.append(record.exit)
    return config, summary, exits


# ---------------------------------------------------------------------------------------------- single run


def test_single_run_writes_its_outputs(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=none", f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    for name in (".hydra/config.yaml", "train.log", "checkpoints/last.pt", "checkpoints/best.pt", "results.json"):
        assert (run_dir / name).is_file(), f"{name} missing from the run dir"
    assert not (tmp_path / "outputs").exists(), "wrote outside hydra.run.dir"
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert (config["model"]["name"], config["dataset"]["name"], config["trainer"]["epochs"]) == ("mlp", "digits", 1)
    results = assert_finished(run_dir)
    assert (results["model"], results["dataset"], results["sampler"], results["ratio"]) == ("mlp", "digits", "topk", 0.5)
    assert len(results["epochs"]) == 1 and results["best_metric"] > 0.5
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-6)
    assert "finished" in (run_dir / "train.log").read_text()
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["config"]["model"]["name"] == "mlp"


# ---------------------------------------------------------------------------------------------- bad overrides

BAD_OVERRIDES = {
    "ratio_out_of_range": (["ratio=1.5"], ["ratio=1.5", "allowed"]),
    "ratio_not_a_number": (["ratio=abc"], ["ratio='abc'", "allowed"]),
    "ratio_a_list": (["ratio=[1,2]"], ["ratio=[1, 2]", "allowed"]),
    "unknown_sampler": (["sampler=nope"], ["sampler=nope", "allowed: bernoulli"]),
    "unknown_model": (["model=nope"], ["model=nope", "allowed: cnn"]),
    "model_option_not_a_number": (["model.hidden=abc"], ["model.hidden='abc'", "allowed: an integer >= 1"]),
    "rule_matching_nothing": (["layers.rules=[{match: nothing}]"], ["match='nothing'", "matches no layer", "layers: fc1"]),
    "missing_offline_dataset": (["dataset=cifar10", "dataset.root=<empty>", "dataset.download=false"],
                                ["'cifar10' not found", "<empty>", "dataset=digits"]),
    "missing_ptb": (["model=lstm", "dataset=ptb", "dataset.root=<empty>"], ["'ptb' not found", "<empty>", "dataset=synthetic"]),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_override_is_one_line_error(case, cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides, names = BAD_OVERRIDES[case]
    overrides = [item.replace("<empty>", str(empty)) for item in overrides]
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=none", f"hydra.run.dir={run_dir}", *overrides)
    message = assert_clean_failure(process, *[name.replace("<empty>", str(empty)) for name in names])
    assert not list(tmp_path.rglob("*.pt")), "a failed run wrote a checkpoint"
    results = read_results(run_dir)
    if results is not None:  # the failure is recorded where the run would have written
        assert results["status"] == "failed" and results["error"] == message


def test_bad_kernel_backend_in_the_environment_is_one_line_and_writes_nothing(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=none", f"hydra.run.dir={run_dir}", env={"APPROXTRAIN_KERNELS": "triton:nope"})
    assert process.returncode == 2
    assert_clean_failure(process, "APPROXTRAIN_KERNELS='triton:nope' is invalid",
                         "allowed: torch, triton, triton:<pieces> with pieces from scores, topk, columns, linear")
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("overrides, names", [
    (["trainer.epoch=2"], ["trainer.epoch=2 is not a config key", "allowed under trainer:", "epochs", "+trainer.epoch=2"]),
    (["model.dept=2", "model=wrn"], ["model.dept=2 is not a config key", "allowed under model:", "depth, dropout"]),
    (["fo=1"], ["fo=1 is not a config key", "allowed: callbacks, dataset", "ratio"]),
    (["+ratio=0.3"], ["An item is already at 'ratio'", "'ratio=0.3'"]),
    (["ratio=[0.3"], ["'[0.3'"]),
])
def test_hydra_composition_error_is_one_line(overrides, names, cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=none", f"hydra.run.dir={run_dir}", *overrides)
    assert_clean_failure(process, *names)
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr  # Hydra's own lines are replaced
    assert not run_dir.exists(), "a run that never started left a run dir"


# ---------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_multirun_grid_runs_every_job_and_prints_the_table(cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = cli("-m", *SMALL, "logger=none", "sampler=exact,topk", "ratio=0.3,0.5", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stdout + process.stderr
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    runs = [(results["sampler"], results["ratio"]) for results in map(assert_finished, jobs)]
    assert sorted(runs) == [("exact", 1.0), ("exact", 1.0), ("topk", 0.3), ("topk", 0.5)]  # exact runs record the ratio in effect
    for job in jobs:
        assert (job / "checkpoints" / "last.pt").is_file() and (job / ".hydra" / "config.yaml").is_file()
    try:
        from approxtrain.compare import print_sweep_table  # noqa: F401 - only whether it imports
    except ImportError:
        return  # the comparison package is optional: the callback skips the table
    last_job = process.stdout.rfind("finished: best")
    table = process.stdout[last_job:]
    assert "mlp / digits" in table, process.stdout[-3000:]
    assert "exact" in table and "topk" in table


@pytest.mark.slow
def test_multirun_records_a_failing_job_and_exits_nonzero(cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = cli("-m", *SMALL, "logger=none", "layers=paper,gates", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert process.returncode != 0
    assert "Traceback" not in process.stdout + process.stderr
    assert_finished(sweep_dir / "0")
    failed = read_results(sweep_dir / "1")
    assert failed is not None and failed["status"] == "failed" and failed["sampler"] == "topk"
    assert failed["error"].startswith("layer rule #1 (match='rnn.*.gates'")  # found when the job builds its model
    assert not (sweep_dir / "1" / "checkpoints").exists()
    lines = process.stderr.strip().splitlines()
    summary = lines.index("approxtrain: 1 job(s) failed:")
    failures = lines[summary + 1 :]
    assert len(failures) == 1 and failures[0].strip().startswith("job 1 (") and "layers=gates" in failures[0]
    assert failures[0].endswith(failed["error"])


# ---------------------------------------------------------------------------------------------- W&B offline


@pytest.mark.slow
def test_wandb_offline_run_inside_the_run_dir(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=wandb", f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline", "HOME": str(tmp_path)})
    assert process.returncode == 0, process.stderr[-3000:]
    assert_finished(run_dir)
    config, summary, exits = wandb_contents(wandb_run_file(run_dir))
    axes = (config["model"]["name"], config["dataset"]["name"], config["sampler"]["name"], config["ratio"], config["seed"],
            config["layers"]["name"])
    assert axes == ("mlp", "digits", "topk", 0.5, 0, "paper")  # nested as Hydra composed it
    assert config["trainer"]["optimizer"]["lr"] == 0.001
    assert summary.get("status") == "finished" and summary.get("compute_reduction") == pytest.approx(0.5)
    assert exits and exits[-1].exit_code == 0


def wandb_history(path: Path) -> list[tuple[int, dict]]:
    """(step, row) of every history record of an offline W&B run file."""
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append((record.history.step.num, row))
    return rows


def wandb_records_of(path: Path, kind: str) -> list:
    return [getattr(record, kind) for record in read_wandb_records(path) if record.WhichOneof("record_type") == kind]


@pytest.mark.slow
def test_wandb_rows_at_the_optimizer_step_a_model_artifact_and_resume_keeps_the_run(cli, tmp_path):
    """Every history row's step is the optimizer step and carries its epoch; the run's files and a
    ``model`` artifact are recorded; ``resume=`` continues the same W&B run (same id), its steps going on."""
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "HOME": str(tmp_path)}
    first = cli(*SMALL, "logger=wandb", "trainer.log_every_n_steps=3", f"hydra.run.dir={run_dir}", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("trainer.epochs=2", f"resume={run_dir}", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    results = assert_finished(run_dir)
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda path: path.parent.name)
    assert len(files) == 2
    run_ids = [run.run_id for path in files for run in wandb_records_of(path, "run")]
    assert run_ids == [(run_dir / "wandb" / "run_id").read_text()] * 2
    history = [entry for path in files for entry in wandb_history(path)]
    steps = [step for step, _ in history]
    assert all(row["_step"] == step and "epoch" in row for step, row in history)
    assert steps == sorted(steps) and steps[-1] == results["steps"]
    epoch_rows = [(step, row) for step, row in history if "test/accuracy" in row]
    assert [(step, row["epoch"], row["test/accuracy"]) for step, row in epoch_rows] == \
        [(epoch["step"], epoch["epoch"], pytest.approx(epoch["test_metric"])) for epoch in results["epochs"]]
    step_rows = [step for step, row in history if "train/loss" in row]
    assert step_rows[:2] == [3, 6] and set(step_rows) >= {epoch["step"] for epoch in results["epochs"]}
    for path in files:
        (artifact,) = [artifact for artifact in wandb_records_of(path, "artifact") if artifact.type == "model"]
        assert artifact.name == f"model-{run_ids[0]}"
        assert sorted(entry.path for entry in artifact.manifest.contents) == ["best.pt", "last.pt"]
        saved = {item.path for record in wandb_records_of(path, "files") for item in record.files}
        assert {".hydra/config.yaml", ".hydra/overrides.yaml", "results.json"} <= saved


@pytest.mark.slow
def test_the_default_logger_without_wandb_trains_with_a_one_line_hint(cli, tmp_path):
    """``logger=wandb`` is the default; where wandb cannot be imported the run trains as with ``logger=none``."""
    blocked = tmp_path / "blocked" / "wandb"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    path = os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")]))
    run_dir = tmp_path / "run"
    process = cli(*SMALL, f"hydra.run.dir={run_dir}", env={"PYTHONPATH": path})
    assert process.returncode == 0, process.stderr[-3000:]
    assert_finished(run_dir)
    hints = [line for line in process.stdout.splitlines() if "W&B:" in line]
    assert len(hints) == 1 and hints[0].endswith(
        "W&B: cannot import wandb (No module named 'wandb'); logging as logger=none (install it: pip install wandb)")
    assert not (run_dir / "wandb").exists()


@pytest.mark.slow
def test_wandb_auto_mode_without_api_key_logs_offline(cli, tmp_path):
    run_dir = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": None, "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb")}
    process = cli(*SMALL, "logger=wandb", "logger.mode=auto", f"hydra.run.dir={run_dir}", env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    hints = [line for line in process.stdout.splitlines() if "no API key configured" in line]
    assert len(hints) == 1 and "logging offline" in hints[0]
    assert_finished(run_dir)
    config, summary, exits = wandb_contents(wandb_run_file(run_dir))
    assert config["model"]["name"] == "mlp" and summary.get("status") == "finished"


@pytest.mark.slow
def test_wandb_run_is_finished_as_failed_when_the_run_fails(cli, tmp_path):
    """A layer rule matching nothing fails in surgery, after W&B is initialised."""
    run_dir = tmp_path / "run"
    process = cli(*SMALL, "logger=wandb", "layers.rules=[{match: nothing}]", f"hydra.run.dir={run_dir}",
                  env={"WANDB_MODE": "offline", "HOME": str(tmp_path)})
    message = assert_clean_failure(process, "match='nothing'")
    results = read_results(run_dir)
    assert results["status"] == "failed" and results["error"] == message
    config, summary, exits = wandb_contents(wandb_run_file(run_dir))
    assert config["model"]["name"] == "mlp"
    assert summary.get("status") == "failed" and summary.get("error") == message
    assert exits and exits[-1].exit_code == 1


@pytest.mark.slow
def test_wandb_online_without_a_server_logs_offline_within_the_bound(cli, tmp_path):
    """An API key, logger.mode=online and a W&B server that never answers: one line within
    logger.init_timeout_s (not W&B's 90 s), then the run trains and logs offline; train.log stays plain."""
    run_dir, home = tmp_path / "run", tmp_path / "home"
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "WANDB_API_KEY": "0" * 40,
               "WANDB_BASE_URL": url, "FORCE_COLOR": "1"}
        process = cli(*SMALL, "logger=wandb", "logger.mode=online", "logger.init_timeout_s=3", f"hydra.run.dir={run_dir}", env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert_finished(run_dir)
    offline_run = wandb_run_file(run_dir).parent
    expected = (f"W&B: cannot reach {url} within 3 s (logger.mode=online); "
                f"logging offline to {offline_run} (upload later with `wandb sync {offline_run}`)")
    lines = [line for line in process.stdout.splitlines() if "W&B:" in line]
    assert len(lines) == 1 and lines[0].endswith(expected), lines
    assert not list((run_dir / "wandb").glob("run-*")), "an online W&B run was started"
    config, summary, exits = wandb_contents(wandb_run_file(run_dir))
    assert config["model"]["name"] == "mlp" and summary.get("status") == "finished" and exits[-1].exit_code == 0
    train_log = (run_dir / "train.log").read_text()
    assert "\x1b" not in train_log
    (logged,) = [line for line in train_log.splitlines() if line.endswith(expected)]
    logged_at = datetime.strptime(logged[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    job_started = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    assert logged_at - job_started < 3 + 30  # the bound, plus importing and starting offline W&B


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_through_the_cli_equals_an_uninterrupted_run(cli, tmp_path):
    common = ("model=mlp", "dataset=digits", "trainer.num_workers=0", "trainer.device=cpu", "logger=none", "sampler=nps", "ratio=0.4")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert cli(*common, "trainer.epochs=2", f"hydra.run.dir={run_a}").returncode == 0
    assert cli(*common, "trainer.epochs=1", f"hydra.run.dir={run_b}").returncode == 0
    assert len(read_results(run_b)["epochs"]) == 1
    process = cli("trainer.epochs=2", f"resume={run_b}")  # the run's own config; hydra.run.dir follows resume
    assert process.returncode == 0, process.stderr[-3000:]
    config = yaml.safe_load((run_b / ".hydra" / "config.yaml").read_text())  # the record says how the run went on
    assert (config["sampler"]["name"], config["ratio"], config["trainer"]["epochs"]) == ("nps", 0.4, 2)
    assert not (tmp_path / "outputs").exists(), "the resumed run did not write into the run dir it continues"
    uninterrupted, resumed = assert_finished(run_a), assert_finished(run_b)
    for key in ("best_metric", "final_metric", "compute_reduction", "steps"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    assert len(resumed["epochs"]) == len(uninterrupted["epochs"]) == 2
    for mine, theirs in zip(resumed["epochs"], uninterrupted["epochs"]):
        for key in ("train_loss", "test_metric", "compute_reduction"):
            assert math.isclose(mine[key], theirs[key], abs_tol=1e-6), (mine["epoch"], key)
    assert load_checkpoint(run_b / "checkpoints" / "last.pt")["state"]["epoch"] == 2
