"""``train()``: one step of every model on synthetic data, real-data runs, exact resume, atomic outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from approxtrain.checks import ConfigError
from approxtrain.config import validate
from approxtrain.run import rundir as results_module
from approxtrain.run.checkpoint import load_checkpoint, save_checkpoint
from approxtrain.run.optim import build_optimizer, build_scheduler
from approxtrain.run.rundir import write_results
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import train
from approxtrain.spec import trainer_spec
from conftest import EPOCH_KEYS, PLAN_ROW_KEYS, RESULT_KEYS


def check_results(results: dict, run_dir: Path, *, model: str, dataset: str, sampler: str = "topk", ratio: float = 0.5,
                  metric_name: str = "accuracy") -> None:
    """results.json is the returned dict, finished, with every contract key well-formed."""
    on_disk = read_results(run_dir)
    assert on_disk is not None, "no results.json in the run dir"
    assert on_disk == json.loads(json.dumps(results)), "results.json differs from the returned results"
    missing = [key for key in RESULT_KEYS if key not in on_disk]
    assert not missing, f"results.json lacks {missing}"
    assert on_disk["status"] == "finished"
    assert (on_disk["model"], on_disk["dataset"], on_disk["sampler"], on_disk["ratio"]) == (model, dataset, sampler, ratio)
    assert on_disk["metric_name"] == metric_name
    assert 0.0 <= on_disk["compute_reduction"] <= 1.0
    assert on_disk["epochs"], "no epoch recorded"
    for record in on_disk["epochs"]:
        assert all(key in record for key in EPOCH_KEYS), record
        assert math.isfinite(record["train_loss"]) and record["time_s"] >= 0
        assert 0.0 <= record["compute_reduction"] <= 1.0
    assert on_disk["final_metric"] == on_disk["epochs"][-1]["test_metric"]
    assert on_disk["best_metric"] is not None
    assert on_disk["layers"], "no layer plan rows"
    for row in on_disk["layers"]:
        assert all(key in row for key in PLAN_ROW_KEYS), row
    assert on_disk["wall_time_s"] > 0 and on_disk["step_time_s"] > 0
    assert on_disk["device"] == "cpu"
    assert isinstance(on_disk["peak_memory_bytes"], int) and on_disk["peak_memory_bytes"] > 0


def tmp_files(run_dir: Path) -> list[Path]:
    return [path for path in run_dir.rglob("*") if path.name.endswith(".tmp")]


# One optimisation step of each model on synthetic data shaped like its paper dataset.
ONE_STEP = {
    "mlp": ("dataset.num_samples=8", "dataset.batch_size=4", "dataset.eval_batch_size=4", "trainer.checkpoint=true"),
    "cnn": ("dataset.num_samples=8", "dataset.batch_size=4", "dataset.eval_batch_size=4", "trainer.checkpoint=true"),
    "lstm": ("dataset.num_samples=4", "dataset.batch_size=2", "dataset.eval_batch_size=2", "dataset.seq_len=5",
             "trainer.checkpoint=true"),
    "wrn": ("dataset.num_samples=2", "dataset.batch_size=2", "dataset.eval_batch_size=2", "trainer.checkpoint=false"),
    "resnet50": ("dataset.num_samples=2", "dataset.batch_size=2", "dataset.eval_batch_size=2", "dataset.image_size=32",
                 "trainer.checkpoint=false"),
}


@pytest.mark.parametrize("model", list(ONE_STEP))
def test_one_step_on_synthetic(model, run_cfg, run_dir):
    cfg = run_cfg(f"model={model}", "dataset=synthetic", "trainer.max_steps=1", *ONE_STEP[model])
    results = train(cfg, run_dir)
    metric = "perplexity" if model == "lstm" else "accuracy"
    check_results(results, run_dir, model=model, dataset="synthetic", metric_name=metric)
    assert results["steps"] == 1 and len(results["epochs"]) == 1
    # topk keeps a fixed k per layer: the measured reduction is the planned one
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-9)
    assert 0.0 < results["compute_reduction"] < 1.0
    sampled = [row for row in results["layers"] if row["policy"] == "topk"]
    assert sampled and all(row["k"] < row["n"] for row in sampled)
    assert (run_dir / "checkpoints" / "last.pt").exists() == cfg["trainer"]["checkpoint"]
    if model == "lstm":
        assert math.isfinite(results["final_metric"]) and results["final_metric"] > 1


def test_lstm_gates_unrolled_one_step(run_cfg, run_dir):
    cfg = run_cfg("model=lstm", "layers=gates", "dataset=synthetic", "trainer.max_steps=1", *ONE_STEP["lstm"])
    assert cfg["model"]["cell"] == "unrolled"
    results = train(cfg, run_dir)
    check_results(results, run_dir, model="lstm", dataset="synthetic", metric_name="perplexity")
    policies = {row["name"]: row["policy"] for row in results["layers"]}
    assert policies == {"rnn.0.gates": "topk", "rnn.1.gates": "topk", "decoder": "topk"}
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-9)
    assert results["compute_reduction"] == pytest.approx(0.5, abs=0.01)


def test_mlp_digits_two_epochs_learns(run_cfg, run_dir):
    cfg = run_cfg("model=mlp", "dataset=digits", "sampler=topk", "ratio=0.5", "trainer.epochs=2")
    results = train(cfg, run_dir)
    check_results(results, run_dir, model="mlp", dataset="digits")
    assert [record["epoch"] for record in results["epochs"]] == [1, 2]
    assert results["best_metric"] > 0.8, results["epochs"]
    assert results["best_metric"] == max(record["val_metric"] for record in results["epochs"])  # chosen on validation
    assert results["test_metric_at_best"] == results["epochs"][results["best_epoch"] - 1]["test_metric"]
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-6)
    assert results["compute_reduction"] == pytest.approx(0.5, abs=1e-6)
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    assert not tmp_files(run_dir)


def test_mlp_mnist_shared_data(run_cfg, run_dir, shared_data):
    cfg = run_cfg("model=mlp", "dataset=mnist", f"dataset.root={shared_data}", "dataset.download=false", "trainer.max_steps=30")
    results = train(cfg, run_dir)
    check_results(results, run_dir, model="mlp", dataset="mnist")
    assert results["steps"] == 30
    assert results["best_metric"] > 0.5  # 30 Adam steps of batch 50 on real MNIST
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-6)


def test_lstm_ptb_shared_data_reports_perplexity(run_cfg, run_dir, shared_data):
    # the paper's optimisation (experiment=lstm_ptb) on ptb.valid.txt, a narrow LSTM to keep the test-set pass short
    cfg = run_cfg("experiment=lstm_ptb", "trainer.epochs=1", "trainer.max_steps=2", "dataset.train_split=valid",
                  f"dataset.root={shared_data / 'PTB'}", "model.hidden=64", "dataset.eval_batch_size=100",
                  "trainer.checkpoint=false")
    results = train(cfg, run_dir)
    check_results(results, run_dir, model="lstm", dataset="ptb", metric_name="perplexity")
    assert results["steps"] == 2
    perplexity = results["final_metric"]
    assert math.isfinite(perplexity) and 1 < perplexity < 10_000  # PTB's vocabulary: 10k words


# Resume: 2 epochs in one go == 1 epoch, then continued to 2 from the checkpoint.
# CNN (dropout: torch RNG), nps (the sampler generator), a per-step schedule (scheduler state).
RESUME = ("model=cnn", "dataset=digits", "sampler=nps", "ratio=0.5", "model.hidden=64",
          "trainer.scheduler.name=multistep", "trainer.scheduler.interval=step", "trainer.scheduler.milestones=[20,40]")


def assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["status"] == uninterrupted["status"] == "finished"
    assert len(resumed["epochs"]) == len(uninterrupted["epochs"]) == 2
    for key in ("best_metric", "final_metric", "compute_reduction"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    for mine, theirs in zip(resumed["epochs"], uninterrupted["epochs"]):
        for key in ("epoch", "step", "lr"):
            assert mine[key] == theirs[key], key
        for key in ("train_loss", "test_metric", "compute_reduction"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (mine["epoch"], key)
    assert resumed["steps"] == uninterrupted["steps"]


def test_resume_equals_uninterrupted(run_cfg, tmp_path):
    uninterrupted = train(run_cfg(*RESUME, "trainer.epochs=2"), tmp_path / "a")
    first = train(run_cfg(*RESUME, "trainer.epochs=1"), tmp_path / "b")
    assert len(first["epochs"]) == 1
    resumed = train(run_cfg(*RESUME, "trainer.epochs=2", f"resume={tmp_path / 'b'}"), tmp_path / "b")
    assert_same_run(resumed, uninterrupted)
    assert_same_run(read_results(tmp_path / "b"), read_results(tmp_path / "a"))
    # a random sampler: the run differs from another seed's (the generator state is what was restored)
    assert uninterrupted["epochs"][0]["train_loss"] != train(run_cfg(*RESUME, "seed=1"), tmp_path / "c")["epochs"][0]["train_loss"]


def test_resume_without_checkpoint_is_one_line_error(run_cfg, tmp_path):
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        train(run_cfg("model=mlp", "dataset=digits", f"resume={tmp_path / 'nothing'}"), tmp_path / "run")


# Atomic outputs: a write that fails midway leaves the previous file intact and no temporary file.

def test_results_write_failing_midway_keeps_previous(tmp_path, monkeypatch):
    write_results(tmp_path, {"status": "running", "best_metric": 0.5})

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(results_module.os, "fsync", fail)  # after the new text is written, before the move
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, {"status": "finished", "best_metric": 0.9, "padding": "x" * 100_000})
    monkeypatch.undo()
    assert read_results(tmp_path) == {"status": "running", "best_metric": 0.5}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json"]


def test_results_write_interrupted_keeps_previous(tmp_path, monkeypatch):
    write_results(tmp_path, {"status": "running"})
    real_fdopen = os.fdopen

    class Interrupting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(results_module.os, "fdopen", lambda fd, mode: Interrupting(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, {"status": "finished", "epochs": list(range(1000))})
    monkeypatch.undo()
    assert read_results(tmp_path) == {"status": "running"}
    assert not tmp_files(tmp_path)


def test_checkpoint_save_failing_midway_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "weight": torch.ones(3)})

    def partial_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(RuntimeError, match="killed while saving"):
        save_checkpoint(path, {"step": 2, "weight": torch.zeros(3)})
    monkeypatch.undo()
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weight"], torch.ones(3))
    assert not tmp_files(tmp_path)


def test_training_killed_while_checkpointing_keeps_last_good_outputs(run_cfg, run_dir, monkeypatch):
    """A run dying in epoch 2's checkpoint leaves epoch 1's results.json and last.pt whole."""
    real_save = torch.save
    saves = {"count": 0}

    def save_then_die(obj, handle, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] > 2:  # epoch 1 writes last.pt and best.pt
            handle.write(b"half")
            raise KeyboardInterrupt
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg("model=mlp", "dataset=digits", "trainer.epochs=2"), run_dir)
    monkeypatch.undo()
    results = read_results(run_dir)
    assert results["status"] == "running" and len(results["epochs"]) == 1
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    assert not tmp_files(run_dir)


# Learning-rate schedules as the presets configure them.

def epoch_rates(trainer: dict, intervals: int) -> list[float]:
    """The learning rate of each of ``intervals`` scheduler intervals (epochs or steps) of the ``trainer`` config."""
    spec = trainer_spec(trainer)
    optimizer = build_optimizer(spec.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(spec.scheduler, optimizer)
    rates = []
    for _ in range(intervals):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_lstm_ptb_schedule_decays_after_six_epochs(run_cfg):
    trainer = run_cfg("experiment=lstm_ptb")["trainer"]
    rates = epoch_rates(trainer, 39)
    assert rates[:6] == [1.0] * 6  # Zaremba et al.: lr 1 for 6 epochs, then x0.8 per epoch
    assert rates[6:] == pytest.approx([0.8**i for i in range(1, 34)])


def test_wrn_schedule_steps_at_40k_and_60k_iterations(run_cfg):
    trainer = run_cfg("experiment=wrn_cifar100")["trainer"]
    assert trainer["scheduler"]["interval"] == "step"
    rates = epoch_rates(trainer, 60_001)
    assert rates[0] == rates[39_999] == 0.1
    assert rates[40_000] == pytest.approx(0.01) and rates[59_999] == pytest.approx(0.01)
    assert rates[60_000] == pytest.approx(0.001)


def test_epoch_records_the_learning_rate_it_trained_with(run_cfg, run_dir):
    cfg = run_cfg("model=mlp", "dataset=synthetic", "dataset.num_samples=8", "dataset.batch_size=4", "dataset.eval_batch_size=4",
                  "trainer.epochs=3", "trainer.optimizer.name=sgd", "trainer.optimizer.lr=1.0",
                  "trainer.scheduler.name=exponential", "trainer.scheduler.gamma=0.5", "trainer.scheduler.start=1",
                  "trainer.checkpoint=false")
    results = train(cfg, run_dir)
    assert [record["lr"] for record in results["epochs"]] == pytest.approx([1.0, 0.5, 0.25])
    assert [record["step"] for record in results["epochs"]] == [2, 4, 6]


# Optimizer presets: trainer.optimizer.name.

@pytest.mark.parametrize("name, cls, arguments", [
    ("adam", torch.optim.Adam, {"betas": (0.5, 0.9), "eps": 1e-6, "weight_decay": 0.01}),
    ("adamw", torch.optim.AdamW, {"betas": (0.5, 0.9), "eps": 1e-6, "weight_decay": 0.05}),
    ("sgd", torch.optim.SGD, {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
])
def test_optimizer_preset_builds_its_class_with_the_configured_arguments(name, cls, arguments, run_cfg):
    overrides = [f"trainer.optimizer.{key}={list(value) if isinstance(value, tuple) else value}" for key, value in arguments.items()]
    spec = validate(run_cfg(f"trainer.optimizer.name={name}", "trainer.optimizer.lr=0.02", *overrides)).trainer
    optimizer = build_optimizer(spec.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.02 and {key: group[key] for key in arguments} == arguments


def test_warmup_cosine_rises_linearly_then_decays_to_min_lr(run_cfg):
    trainer = run_cfg("trainer.scheduler.name=warmup_cosine", "trainer.scheduler.warmup_steps=4", "trainer.scheduler.min_lr=0.0001",
                      "trainer.scheduler.interval=step", "trainer.optimizer.lr=0.001")["trainer"]
    spec = trainer_spec(trainer)
    optimizer = build_optimizer(spec.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(spec.scheduler, optimizer, length=14)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001])  # linear warmup to lr over 4 steps
    assert rates[4] == pytest.approx(0.001) and all(a > b for a, b in zip(rates[4:], rates[5:]))  # then only down
    halfway = 4 + 5  # (14 - 4) / 2 steps into the cosine: the mean of lr and min_lr
    assert rates[halfway] == pytest.approx((0.001 + 0.0001) / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)  # at the end of the run: min_lr


# Any optimizer / scheduler class by _target_ (issue 20: the standard recipes).

def test_an_optimizer_and_a_scheduler_by_target_get_their_arguments(run_cfg):
    spec = validate(run_cfg("trainer.optimizer._target_=torch.optim.RMSprop", "trainer.optimizer.lr=0.02",
                            "trainer.optimizer.weight_decay=0.01", "+trainer.optimizer.kwargs.alpha=0.8",
                            "+trainer.optimizer.kwargs.momentum=0.5",
                            "trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR", "+trainer.scheduler.kwargs.step_size=2",
                            "+trainer.scheduler.kwargs.gamma=0.5")).trainer
    optimizer = build_optimizer(spec.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer) is torch.optim.RMSprop
    group = optimizer.param_groups[0]
    # the preset fields (momentum 0.9, eps 1e-8 for adam) do not leak: RMSprop keeps its own eps
    assert (group["lr"], group["weight_decay"], group["alpha"], group["momentum"], group["eps"]) == (0.02, 0.01, 0.8, 0.5, 1e-8)
    scheduler = build_scheduler(spec.scheduler, optimizer, length=10)
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR and (scheduler.step_size, scheduler.gamma) == (2, 0.5)


@pytest.mark.parametrize("overrides, message", [
    (("trainer.optimizer._target_=torch.optim.Nope",), "trainer.optimizer._target_=torch.optim.Nope is invalid"),
    (("trainer.optimizer._target_=torch.nn.Linear",), "(not a subclass of torch.optim.optimizer.Optimizer)"),
    (("trainer.optimizer._target_=torch.optim.RMSprop", "trainer.optimizer.momentum=0.5"),
     "trainer.optimizer.momentum=0.5 is invalid with trainer.optimizer._target_=torch.optim.RMSprop"),
    (("trainer.optimizer._target_=torch.optim.RMSprop", "+trainer.optimizer.kwargs.betas=[0.9,0.99]"),
     "trainer.optimizer.kwargs={'betas': [0.9, 0.99]} is invalid for torch.optim.RMSprop"),
    (("+trainer.optimizer.kwargs.alpha=0.9",), "trainer.optimizer.kwargs={'alpha': 0.9} is invalid without trainer.optimizer._target_"),
    (("trainer.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",), "(it steps on a metric)"),
    (("trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR",), "missing a required argument: 'step_size'"),
])
def test_a_bad_target_or_argument_is_one_line_naming_the_key(overrides, message, run_cfg):
    with pytest.raises(ConfigError) as error:
        validate(run_cfg(*overrides))
    assert message in str(error.value) and "allowed: " in str(error.value) and "\n" not in str(error.value)


def test_resume_with_an_optimizer_and_scheduler_by_target_equals_uninterrupted(run_cfg, tmp_path):
    recipe = ("model=mlp", "dataset=digits", "sampler=nps", "ratio=0.5", "trainer.optimizer._target_=torch.optim.AdamW",
              "trainer.optimizer.weight_decay=0.05", "+trainer.optimizer.kwargs.amsgrad=true", "trainer.scheduler.interval=step",
              "trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR", "+trainer.scheduler.kwargs.step_size=5",
              "+trainer.scheduler.kwargs.gamma=0.5")
    uninterrupted = train(run_cfg(*recipe, "trainer.epochs=2"), tmp_path / "a")
    train(run_cfg(*recipe, "trainer.epochs=1"), tmp_path / "b")
    resumed = train(run_cfg(*recipe, "trainer.epochs=2", f"resume={tmp_path / 'b'}"), tmp_path / "b")
    assert_same_run(resumed, uninterrupted)
    assert uninterrupted["epochs"][1]["lr"] < uninterrupted["epochs"][0]["lr"]  # the schedule ran
