"""Run dirs that never collide and a ``resume=`` that reads the run instead of damaging it.

The refusals happen in ``main()`` before Hydra runs, so most are checked in this process
(``main()`` with ``sys.argv`` set); what needs two processes -- a dir held by a live run,
runs started together -- runs the installed CLI.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from approxtrain.cli.resume import merge_overrides, parse_overrides, refused_changes
from approxtrain.cli.train import main, settle_run_dir
from approxtrain.run.checkpoint import load_checkpoint, save_checkpoint
from approxtrain.run.rundir import LOCK_FILE, claim_new_dir, hold, holder, recorded_run, release, write_results
from approxtrain.run.schema import Results, read_results
from approxtrain.run.trainer import train
from conftest import approxtrain_command, compose_config, to_run_config

TINY = ("model=mlp", "dataset=digits", "logger=none", "trainer.max_steps=2", "trainer.num_workers=0", "trainer.device=cpu")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) and its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def refusal(monkeypatch, capsys, *args: str) -> str:
    """Run ``main()`` with ``args``; it must exit 2 with one ``approxtrain: error:`` line; returns the line."""
    monkeypatch.setattr(sys, "argv", ["approxtrain", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("approxtrain: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run (sampler nps, 1 epoch) with the files Hydra writes; tests use copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = [*TINY, "sampler=nps", "trainer.epochs=1"]
    cfg = compose_config(*overrides, return_hydra_config=False)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    assert train(to_run_config(cfg), run_dir)["status"] == "finished"
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> Path:
    """A copy of the finished run in tmp_path, which is also the working dir (where ``outputs/`` would go)."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o644)])
def test_results_and_checkpoints_are_0644_less_the_umask(umask, mode, tmp_path):
    """Readable by the group (not mkstemp's 0600), and never more than the umask allows."""
    previous = os.umask(umask)
    try:
        write_results(tmp_path, Results(model="mlp", dataset="digits", sampler="topk", ratio=0.5, seed=0, layers_rule_set="paper"))
        save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 1})
    finally:
        os.umask(previous)
    for name in ("results.json", "checkpoints/last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------- claiming and holding


def test_claimed_dirs_are_new_even_for_the_same_name(tmp_path):
    taken = tmp_path / "runs" / "2024-01-01_00-00-00"
    taken.mkdir(parents=True)
    first, second = claim_new_dir(taken), claim_new_dir(taken)
    assert (first, second) == (f"{taken}_1", f"{taken}_2")
    assert holder(first) == holder(second) is not None  # held by this process
    assert list(taken.iterdir()) == []  # the existing dir is left alone


def test_hold_and_release(tmp_path):
    assert holder(tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()  # looking creates nothing
    assert hold(tmp_path / "run") is True and hold(tmp_path / "run") is False  # taken once per process
    assert (tmp_path / "run" / LOCK_FILE).is_file() and holder(tmp_path / "run") is not None
    release(tmp_path / "run")
    assert holder(tmp_path / "run") is None


def test_default_run_and_sweep_dirs_are_claimed(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = compose_cfg(), compose_cfg()
    for key, parent in (("run", "outputs/runs"), ("sweep", "outputs/multiruns")):
        dirs = {str(cfg.hydra[key].dir) for cfg in (first, second)}
        assert len(dirs) == 2 and all(d.startswith(f"{parent}/") and Path(d).is_dir() for d in dirs), dirs
    # resolved once: the cached value travels with the config to a sweep's jobs (Hydra's load_sweep_config)
    job = OmegaConf.create(OmegaConf.to_container(first, resolve=False))
    OmegaConf.copy_cache(from_config=first, to_config=job)
    assert job.hydra.sweep.dir == first.hydra.sweep.dir and len(list((tmp_path / "outputs/multiruns").iterdir())) == 2


def test_recorded_run_finds_results_or_checkpoints(tmp_path):
    assert recorded_run(tmp_path) is None
    (tmp_path / "3" / "checkpoints").mkdir(parents=True)
    (tmp_path / "3" / "checkpoints" / "last.pt").write_bytes(b"")
    assert recorded_run(tmp_path) == tmp_path / "3" / "checkpoints" / "last.pt"  # a sweep dir holding a job's run


@pytest.mark.parametrize("content, reason", [(b"", "an empty file"), (b"not a checkpoint", "not a torch zip archive")])
def test_unreadable_checkpoint_is_one_line_naming_it(tmp_path, content, reason):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and reason in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- resume helpers


def test_merged_overrides_keep_the_runs_and_take_the_new_values():
    saved = ["model=mlp", "sampler=nps", "trainer.epochs=1", "resume=/old"]
    given = parse_overrides(["trainer.epochs=5", "resume=/run", "logger=none"])
    assert merge_overrides(saved, given) == ["model=mlp", "sampler=nps", "trainer.epochs=5", "logger=none"]


def test_refused_changes_name_the_group_option():
    saved = {"sampler": {"name": "nps", "k": 1}, "trainer": {"epochs": 1, "num_workers": 2, "optimizer": {"lr": 0.1}},
             "logger": {"name": "wandb"}, "resume": None}
    allowed = {"sampler": {"name": "nps", "k": 1}, "trainer": {"epochs": 9, "num_workers": 0, "optimizer": {"lr": 0.1}},
               "logger": {"name": "none"}, "resume": "/run"}
    assert refused_changes(saved, allowed) == []
    changed = {**allowed, "sampler": {"name": "exact"}, "trainer": {**allowed["trainer"], "optimizer": {"lr": 1.0}}}
    assert refused_changes(saved, changed) == ["sampler.name: 'nps' -> 'exact' (+1 more sampler.* keys)",
                                               "trainer.optimizer.lr: 0.1 -> 1.0"]


def test_refused_changes_take_keys_a_newer_version_added_at_their_current_value():
    saved = {"sampler": {"name": "topk"}}  # written before sampler.k_rounding existed
    current = {"sampler": {"name": "topk", "k_rounding": "nearest"}}
    assert refused_changes(saved, current, current) == []
    moved = {"sampler": {"name": "topk", "k_rounding": "floor"}}
    assert refused_changes(saved, moved, current) == ["sampler.k_rounding: 'nearest' -> 'floor'"]


def test_a_run_from_an_older_version_resumes(run_copy):
    """Its saved config lacks the keys added since (schedule, sampler.k_rounding, ...): they come at
    the values this version gives the run's own overrides, so resuming it is not refused."""
    config = OmegaConf.load(run_copy / ".hydra" / "config.yaml")
    for key in ("schedule", "objective", "search"):
        config.pop(key, None)
    for key in ("k_rounding", "mode", "fixed_k"):
        config.sampler.pop(key, None)
    (run_copy / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    args = settle_run_dir(["--config-name", "train", f"resume={run_copy}", "trainer.epochs=3", "trainer.max_steps=null"])
    release(run_copy)
    assert f"resume={run_copy}" in args
    with pytest.raises(ValueError, match="sampler.k_rounding: 'nearest' -> 'floor'"):
        settle_run_dir(["--config-name", "train", f"resume={run_copy}", "trainer.epochs=3", "trainer.max_steps=null",
                        "sampler.k_rounding=floor"])


def test_a_resume_composes_its_config_once_before_hydra(run_copy, monkeypatch):
    """The config the run continues with is composed (and checked) once; the run's own overrides a
    second time only when its saved config lacks keys this version composes."""
    import approxtrain.cli.compose as composing

    calls = []
    compose = composing.compose
    monkeypatch.setattr(composing, "compose", lambda *arguments: calls.append(arguments) or compose(*arguments))
    settle_run_dir([f"resume={run_copy}", "trainer.epochs=3", "trainer.max_steps=null"])
    release(run_copy)
    assert len(calls) == 1
    config = OmegaConf.load(run_copy / ".hydra" / "config.yaml")
    config.sampler.pop("k_rounding")
    (run_copy / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    settle_run_dir([f"resume={run_copy}", "trainer.epochs=3", "trainer.max_steps=null"])
    release(run_copy)
    assert len(calls) == 3


def test_resume_runs_the_runs_own_command_line_in_its_dir(run_copy):
    args = settle_run_dir(["--config-name", "train", f"resume={run_copy}", "trainer.epochs=3", "trainer.max_steps=null"])
    try:
        assert args == ["--config-name", "train", *[o.replace("max_steps=2", "max_steps=null") for o in TINY],
                        "sampler=nps", "trainer.epochs=3", f"resume={run_copy}", f"hydra.run.dir={run_copy}",
                        "hydra.output_subdir=null"]
        assert holder(run_copy) is not None  # held from here on, before Hydra runs
    finally:
        release(run_copy)


# ---------------------------------------------------------------------------------------------- refusals (nothing written)


@pytest.mark.parametrize("case, args, names", [
    ("explicit dir holding a run", ["hydra.run.dir=<run>", *TINY], ["hydra.run.dir=<run>", "already holds a run", "resume=<run>"]),
    ("sweep into a dir holding runs", ["-m", "hydra.sweep.dir=<tmp>", *TINY, "seed=0,1"], ["already holds a run"]),
    ("resume with another model", ["resume=<run>", "model=cnn", "trainer.epochs=2"], ["model.name: 'mlp' -> 'cnn'", "allowed"]),
    ("resume with another sampler", ["resume=<run>", "sampler=exact", "trainer.epochs=2"], ["sampler.name: 'nps' -> 'exact'"]),
    ("resume of a finished run", ["resume=<run>", "trainer.epochs=2"], ["the run finished (step 2 of", "trainer.max_steps"]),
    ("resume of no dir", ["resume=<tmp>/nothing"], ["resume=<tmp>/nothing: no such run dir"]),
    ("resume of a dir that is no run", ["resume=<run>/checkpoints"], ["not a run dir"]),
    ("resume of an empty checkpoint", ["resume=<run>", "trainer.epochs=2"], ["last.pt", "not a readable checkpoint"]),
    ("resume into another dir", ["resume=<run>", "trainer.epochs=2", "hydra.run.dir=<tmp>/elsewhere"], ["hydra.run.dir"]),
    ("resume in a sweep", ["-m", "resume=<run>", "trainer.epochs=2,3"], ["sweep"]),
])
def test_refusal_writes_nothing(case, args, names, run_copy, tmp_path, monkeypatch, capsys):
    if case == "resume of an empty checkpoint":
        (run_copy / "checkpoints" / "last.pt").write_bytes(b"")
    before = snapshot(tmp_path)

    def fill(text: str) -> str:
        return text.replace("<run>", str(run_copy)).replace("<tmp>", str(tmp_path))

    line = refusal(monkeypatch, capsys, *map(fill, args))
    for name in names:
        assert fill(name) in line, line
    assert snapshot(tmp_path) == before, "a refused command line wrote into the run dir or created files"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------------------------------------- two processes


def test_a_dir_a_live_run_holds_is_refused(finished_run, cli, tmp_path):
    live = tmp_path / "live"  # a run that has just started: its config, no results yet
    (live / ".hydra").mkdir(parents=True)
    shutil.copy(finished_run / ".hydra" / "config.yaml", live / ".hydra" / "config.yaml")
    hold(live)  # this process plays the live run
    try:
        before = snapshot(live)
        process = cli(*TINY, f"hydra.run.dir={live}")
        assert process.returncode == 2, process.stderr[-3000:]
        assert process.stderr.strip().splitlines() == [
            f"approxtrain: error: hydra.run.dir={live}: the dir is held by a live run (pid {holder(live)}); "
            "allowed: a dir no live run holds"]
        assert snapshot(live) == before
    finally:
        release(live)


@pytest.mark.slow
def test_runs_started_together_keep_their_own_dirs(tmp_path):
    # every name the clock can give these runs for the next minutes is taken by an earlier "run": a new run must
    # never write into one, and two runs started together must not share one
    now = datetime.now()
    taken = [tmp_path / "outputs" / "runs" / (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(-2, 240)]
    for path in taken:
        path.mkdir(parents=True)
        (path / "results.json").write_text("{}")
    before = snapshot(tmp_path)
    processes = [subprocess.Popen([*approxtrain_command(), *TINY, f"seed={seed}"], cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (0, 1)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    assert {key: value for key, value in snapshot(tmp_path).items() if key in before} == before
    new = sorted(set((tmp_path / "outputs" / "runs").iterdir()) - set(taken))
    assert len(new) == 2 and all(path.name.rsplit("_", 1)[-1].isdigit() for path in new), new
    assert sorted(read_results(path)["seed"] for path in new) == [0, 1]
    assert all(read_results(path)["status"] == "finished" for path in new)


# ---------------------------------------------------------------------------------------------- resolved dirs (${...})


@pytest.mark.parametrize("case, args", [
    ("run dir through oc.env", ["hydra.run.dir=${oc.env:RUN_PARENT}/run", *TINY]),
    ("run dir through hydra:runtime.cwd", ["hydra.run.dir=${hydra:runtime.cwd}/run", *TINY]),
    ("sweep dir through oc.env", ["-m", "hydra.sweep.dir=${oc.env:RUN_PARENT}", *TINY, "seed=0,1"]),
])
def test_an_interpolated_dir_is_refused_when_it_resolves_to_a_run(case, args, run_copy, tmp_path, monkeypatch, capsys):
    """The decision is taken on the dir Hydra resolves (in the Hydra callback every launcher passes
    through), before Hydra writes its .hydra files or train.log there."""
    monkeypatch.setenv("RUN_PARENT", str(tmp_path))
    before = snapshot(tmp_path)
    line = refusal(monkeypatch, capsys, *args)
    key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    assert line.startswith(f"approxtrain: error: {key}={tmp_path}") and "already holds a run" in line, line
    assert snapshot(tmp_path) == before, "a refused command line wrote into the run dir"


def test_an_interpolated_dir_a_live_run_holds_is_refused(run_copy, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    monkeypatch.setenv("RUN_PARENT", str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", "import sys; from approxtrain.run.rundir import hold; hold(sys.argv[1]); "
                                "print('held', flush=True); sys.stdin.read()", str(empty)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        line = refusal(monkeypatch, capsys, "hydra.run.dir=${oc.env:RUN_PARENT}/empty", *TINY)
        assert f"hydra.run.dir={empty}: the dir is held by a live run (pid {process.pid})" in line
    finally:
        process.communicate(timeout=30)


def test_orphaned_temporary_files_are_removed_when_the_run_dir_is_taken_again(tmp_path):
    """A run killed while writing leaves ``.<name>.<hex>.tmp`` (up to a checkpoint's size): the next start
    or resume of that run (which holds the dir, so nothing else writes there) removes them."""
    run = tmp_path / "run"
    orphans = [run / ".results.json.0badcafe.tmp", run / "checkpoints" / ".last.pt.deadbeef.tmp",
               run / ".hydra" / ".config.yaml.12345678.tmp"]
    kept = [run / "checkpoints" / "last.pt", run / ".notes.tmp", run / "report" / ".report.md.deadbeef.tmp"]
    for path in orphans + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 4096)
    hold(run)
    try:
        assert [path for path in orphans if path.exists()] == [] and all(path.exists() for path in kept)
    finally:
        release(run)


@pytest.mark.parametrize("name, content", [
    ("results.json", "[1, 2]"),
    ("results.json", '{"status": "finished", "epochs": "garbage", "steps": 2}'),
    ("results.json", '{"status": "finished", "epochs": [{"epo'),  # truncated, last.pt intact
    (".hydra/overrides.yaml", "- model=mlp\n  - [unclosed"),
    (".hydra/config.yaml", "model: {name: mlp\ntrainer: ["),
])
def test_a_damaged_record_refuses_the_resume_in_one_line_naming_it(name, content, run_copy, tmp_path, monkeypatch, capsys):
    (run_copy / name).write_text(content)
    before = snapshot(tmp_path)
    line = refusal(monkeypatch, capsys, f"resume={run_copy}", "trainer.epochs=2", "trainer.max_steps=null")
    assert f"{run_copy / name} is damaged" in line, line
    assert snapshot(tmp_path) == before


def test_an_unwritable_default_outputs_dir_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where the outputs dir goes")
    line = refusal(monkeypatch, capsys, *TINY)
    assert line.startswith("approxtrain: error: hydra.run.dir: run dir 'outputs/runs/") and "is not writable (Not a directory" in line


@pytest.mark.slow
def test_a_sweep_dir_under_hydra_runtime_cwd_runs(cli, tmp_path):
    """``${hydra:runtime.cwd}`` in hydra.sweep.dir resolves in the launching process (it was a traceback)."""
    process = cli("-m", *TINY, "seed=0", "hydra.sweep.dir=${hydra:runtime.cwd}/sweep")
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr[-3000:]
    assert read_results(tmp_path / "sweep" / "0")["status"] == "finished"


def test_a_run_dir_outside_the_working_dir_is_said(compose_cfg, tmp_path, monkeypatch, capsys):
    from approxtrain.cli.claim import ClaimRunDir

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    inside = compose_cfg(*TINY, "hydra.run.dir=runs/a")
    ClaimRunDir().on_run_start(inside)
    outside = compose_cfg(*TINY, "hydra.run.dir=../elsewhere")
    ClaimRunDir().on_run_start(outside)
    release(work / "runs" / "a"), release(elsewhere)
    assert capsys.readouterr().err.splitlines() == [
        f"approxtrain: hydra.run.dir is outside the working dir {work}: the run is written to {elsewhere}"]


def test_a_write_that_hits_a_file_size_limit_names_the_file_and_the_cause(tmp_path):
    """torch.save on a full disk says ``inline_container.cc: unexpected pos``; the run says which file and why."""
    script = ("import resource, signal, sys, torch; from approxtrain.run.checkpoint import save_checkpoint\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "try:\n    save_checkpoint(sys.argv[1], {'weight': torch.zeros(100_000)})\n"
              "except OSError as error:\n    print(error)\n")
    path = tmp_path / "checkpoints" / "last.pt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == f"[Errno 27] cannot write {path}: File too large", done.stdout + done.stderr[-2000:]
    assert not path.exists() and not list(path.parent.glob(".*.tmp"))
