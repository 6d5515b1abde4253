"""Checkpoints that can be trusted: read as tensors and plain data only (a crafted file runs
nothing), verified before a resume (flipped bytes are refused), and a best.pt that agrees with
last.pt after a crash between their writes."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import approxtrain.run.trainer as trainer_module
from approxtrain.cli.resume import requeued_run
from approxtrain.cli.train import main
from approxtrain.run.checkpoint import FORMAT, load_checkpoint
from approxtrain.run.rundir import BEST_CHECKPOINT, checkpoint_path
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import Trainer
from conftest import FAST, compose_config, to_run_config

TINY = ("model=mlp", "dataset=digits", "trainer.epochs=2")


class Payload:
    """What a crafted checkpoint carries: unpickling it calls ``exec``, which writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, dict]:
    """A run stopped after epoch 1 of 2 (``trainer.epochs=1``, then resumable with 2) and its config."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    overrides = [*FAST, *TINY[:2]]
    composed = compose_config(*overrides, return_hydra_config=False)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(composed, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    cfg = to_run_config(composed)
    Trainer(cfg, run_dir).fit()
    return run_dir, cfg


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> tuple[Path, dict]:
    run_dir, cfg = stopped_run
    return Path(shutil.copytree(run_dir, tmp_path / "run")), cfg


def test_checkpoints_hold_only_tensors_and_plain_data(run_copy):
    run_dir, _ = run_copy
    checkpoint = torch.load(checkpoint_path(run_dir), weights_only=True)  # raises on anything else
    assert checkpoint["format"] == FORMAT and checkpoint["state"]["best_epoch"] == 1
    assert isinstance(checkpoint["rng"]["numpy"]["key"], torch.Tensor) and isinstance(checkpoint["rng"]["python"]["state"], torch.Tensor)


def test_a_crafted_checkpoint_is_refused_without_running_its_code(run_copy, tmp_path):
    run_dir, cfg = run_copy
    marker = tmp_path / "payload-ran"
    path = checkpoint_path(run_dir)
    torch.save({"format": FORMAT, "config": cfg, "state": Payload(marker)}, path)
    for read in (lambda: load_checkpoint(path), lambda: requeued_run(run_dir, cfg)):
        (run_dir / "results.json").write_text('{"status": "interrupted"}')  # as a requeued job finds it
        with pytest.raises(ValueError) as refused:
            read()
        line = str(refused.value)
        assert str(path) in line and "needs more than tensors and plain data" in line and "\n" not in line, line
    assert not marker.exists(), "unpickling the checkpoint ran its payload"


def test_a_checkpoint_of_the_previous_format_is_refused_in_one_line(tmp_path):
    """Format 1 pickled numpy's RNG state: reading it needs numpy's reconstructor, which is refused."""
    import numpy as np

    path = tmp_path / "last.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(ValueError, match=r"needs more than tensors and plain data.*before checkpoint format 2"):
        load_checkpoint(path)


def flip_tensor_bytes(path: Path, count: int = 4096) -> str:
    """Invert ``count`` bytes in the middle of the largest tensor record; returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
        start = record.header_offset + 30 + name_length + extra_length + max(0, (record.file_size - count) // 2)
        handle.seek(start)
        data = handle.read(min(count, record.file_size))
        handle.seek(start)
        handle.write(bytes(byte ^ 0xFF for byte in data))
    return record.filename


def test_flipped_bytes_in_tensor_data_are_refused(run_copy):
    run_dir, _ = run_copy
    path = checkpoint_path(run_dir)
    record = flip_tensor_bytes(path)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == (f"resume: {str(path)!r} is not a readable checkpoint "
                                  f"(corrupt: the record {record} does not match its checksum)")


def test_resume_of_a_corrupt_checkpoint_writes_nothing(run_copy, monkeypatch, capsys):
    run_dir, _ = run_copy
    flip_tensor_bytes(checkpoint_path(run_dir))
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    monkeypatch.chdir(run_dir.parent)
    monkeypatch.setattr(sys, "argv", ["approxtrain", f"resume={run_dir}", "trainer.epochs=2"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "does not match its checksum" in err[0], err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


class Killed(BaseException):
    """A kill, as the trainer sees it: nothing after it runs (no failure record)."""


def test_best_pt_left_behind_by_a_crash_between_the_writes_is_repaired_on_resume(run_copy, monkeypatch):
    run_dir, cfg = run_copy
    real_save = trainer_module.save_checkpoint

    def die_before_best(path, checkpoint):
        if Path(path).name == BEST_CHECKPOINT and checkpoint["state"]["epoch"] == 2:
            raise Killed
        real_save(path, checkpoint)

    monkeypatch.setattr(trainer_module, "save_checkpoint", die_before_best)
    with pytest.raises(Killed):
        Trainer({**cfg, "resume": str(run_dir), "trainer": {**cfg["trainer"], "epochs": 2}}, run_dir).fit()
    monkeypatch.undo()
    last = load_checkpoint(checkpoint_path(run_dir))["state"]
    assert (last["epoch"], last["best_epoch"]) == (2, 2), "the test needs epoch 2 to improve"
    assert load_checkpoint(checkpoint_path(run_dir, BEST_CHECKPOINT))["state"]["epoch"] == 1  # the stale pair

    results = Trainer({**cfg, "resume": str(run_dir), "trainer": {**cfg["trainer"], "epochs": 2}}, run_dir).fit()
    best = load_checkpoint(checkpoint_path(run_dir, BEST_CHECKPOINT))
    assert best["state"]["epoch"] == 2 and best["state"]["best_metric"] == results.best_metric == read_results(run_dir)["best_metric"]
    assert checkpoint_path(run_dir, BEST_CHECKPOINT).read_bytes() == checkpoint_path(run_dir).read_bytes()

