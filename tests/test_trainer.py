"""The trainer's seams: callback order, failure reporting, rank-aware writing, step reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from approxtrain.cli.train import failed_jobs
from approxtrain.run.callbacks import Callback
from approxtrain.run.checkpoint import load_checkpoint
from approxtrain.run.rundir import checkpoint_path, write_results
from approxtrain.run.schema import Results, read_results
from approxtrain.run.trainer import Trainer

DIGITS = ("model=mlp", "dataset=digits", "dataset.batch_size=200", "trainer.log_every_n_steps=3")


class Recorder(Callback):
    """Records each hook call as (hook, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_start(self, trainer):
        self.calls.append(("start", trainer.steps_per_epoch))

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_step(self, trainer, report):
        self.calls.append(("step", (report.epoch, report.batch, report.step)))
        assert report.samples_per_s > 0 and report.loss > 0 and 0 < report.compute_reduction < 1

    def on_epoch(self, trainer, record):
        self.calls.append(("epoch", record.epoch))
        assert read_results(trainer.run_dir)["epochs"][-1]["epoch"] == record.epoch  # recorded before the hook

    def on_end(self, trainer):
        self.calls.append(("end", trainer.results.status))

    def on_failure(self, trainer, message):
        self.calls.append(("failure", message))


def test_callbacks_see_the_run_in_order(run_cfg, run_dir):
    recorder = Recorder()
    # digits: 1437 training images less 144 held out for validation -> 7 batches of 200 per epoch;
    # reports every 3 steps and at each epoch's end
    results = Trainer(run_cfg(*DIGITS, "trainer.epochs=2"), run_dir, [recorder]).fit()
    assert recorder.calls == [
        ("start", 7),
        ("epoch_start", 1), ("step", (1, 3, 3)), ("step", (1, 6, 6)), ("step", (1, 7, 7)), ("epoch", 1),
        ("epoch_start", 2), ("step", (2, 2, 9)), ("step", (2, 5, 12)), ("step", (2, 7, 14)), ("epoch", 2),
        ("end", "finished"),
    ]
    assert results.steps == 14 and results.status == "finished"


def test_failure_is_recorded_then_reported_to_callbacks(run_cfg, run_dir):
    recorder = Recorder()
    trainer = Trainer(run_cfg(*DIGITS, "layers.rules=[{match: nothing}]"), run_dir, [recorder])
    with pytest.raises(ValueError, match="matches no layer"):
        trainer.fit()
    (hook, message), = recorder.calls
    assert hook == "failure" and message.startswith("layer rule #1 (match='nothing'")
    on_disk = read_results(run_dir)
    assert on_disk["status"] == "failed" and on_disk["error"] == message
    assert not (run_dir / "checkpoints").exists()


def test_a_process_that_does_not_write_leaves_the_run_dir_alone(run_cfg, run_dir):
    recorder = Recorder()
    results = Trainer(run_cfg(*DIGITS), run_dir, [recorder], is_main=False).fit()
    assert results.status == "finished" and results.steps == 7  # 1437 - 144 held out for validation: 7 batches of 200
    assert not run_dir.exists() and recorder.calls == []


def test_failed_resume_leaves_the_earlier_results_untouched(run_cfg, tmp_path):
    earlier = tmp_path / "earlier"
    write_results(earlier, Results(model="mlp", dataset="digits", sampler="topk", ratio=0.5, seed=0,
                                   layers_rule_set="paper", status="finished"))
    before = (earlier / "results.json").read_bytes()
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        Trainer(run_cfg(*DIGITS, f"resume={earlier}"), earlier).fit()
    assert (earlier / "results.json").read_bytes() == before


def make_job(sweep_dir: Path, num: int, overrides: str, results: Results | None) -> None:
    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num, "override_dirname": overrides}}}), job / ".hydra" / "hydra.yaml")
    if results is not None:
        write_results(job, results)


def test_failed_jobs_come_from_the_jobs_results(tmp_path):
    common = dict(model="mlp", dataset="digits", sampler="topk", seed=0, layers_rule_set="paper")
    make_job(tmp_path, 0, "ratio=0.5", Results(ratio=0.5, status="finished", **common))
    make_job(tmp_path, 1, "ratio=1.5", Results(ratio=1.5, status="failed", error="ratio=1.5 is invalid", **common))
    make_job(tmp_path, 2, "ratio=0.3", None)
    make_job(tmp_path, 3, "ratio=0.2", Results(ratio=0.2, status="running", **common))
    make_job(tmp_path, 4, "ratio=0.1", Results(ratio=0.1, status="interrupted", error="interrupted by SIGTERM at step 7", **common))
    assert failed_jobs(tmp_path) == [
        "job 1 (ratio=1.5): ratio=1.5 is invalid",
        "job 2 (ratio=0.3): no results.json (died or stopped before it started training)",
        "job 3 (ratio=0.2): running",
        "job 4 (ratio=0.1): interrupted by SIGTERM at step 7",
    ]
    assert failed_jobs(tmp_path, since=2**40) == []  # jobs of an earlier sweep into the same dir do not count


class StepCounter(Callback):
    """A callback that takes part in training: counts the steps (its state goes into checkpoints)
    and checks the batch hooks' order and what each sees."""

    all_ranks = True

    def __init__(self) -> None:
        self.steps, self.hooks = 0, []

    def on_train_batch_start(self, trainer, batch):
        self.hooks.append(("batch_start", batch.step))
        assert batch.input.device == trainer.device and batch.step == trainer.state.step

    def on_after_backward(self, trainer, batch):
        self.hooks.append(("after_backward", batch.step))
        assert all(parameter.grad is not None for parameter in trainer.model.parameters())

    def on_before_optimizer_step(self, trainer, batch):
        self.hooks.append(("before_optimizer_step", batch.step))

    def on_train_batch_end(self, trainer, epoch, batch):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _counter(trainer: Trainer) -> StepCounter:
    counter, = (callback for callback in trainer.callbacks if isinstance(callback, StepCounter))
    return counter


def test_callbacks_from_the_config_run_every_hook_and_resume_with_their_state(run_cfg, run_dir):
    configured = (*DIGITS, "trainer.epochs=2", "+callbacks.counter._target_=test_trainer.StepCounter")
    trainer = Trainer(run_cfg(*configured, "trainer.max_steps=3"), run_dir)
    trainer.fit()
    assert _counter(trainer).hooks == [(hook, step) for step in range(3)
                                       for hook in ("batch_start", "after_backward", "before_optimizer_step")]
    assert load_checkpoint(checkpoint_path(run_dir))["callbacks"]["StepCounter"] == {"steps": 3}
    resumed = Trainer(run_cfg(*configured, "trainer.max_steps=5", f"resume={run_dir}"), run_dir)
    resumed.fit()
    assert _counter(resumed).steps == 5 and resumed.results.steps == 5


def test_a_process_that_does_not_write_runs_the_training_callbacks_only(run_cfg, run_dir):
    recorder, counter = Recorder(), StepCounter()
    Trainer(run_cfg(*DIGITS, "trainer.max_steps=2"), run_dir, [recorder, counter], is_main=False).fit()
    assert recorder.calls == [] and counter.steps == 2


def test_a_configured_callback_that_is_no_callback_is_one_line(run_cfg, run_dir):
    with pytest.raises(ValueError, match=r"^callbacks.oops._target_ builds a OrderedDict; allowed: a subclass of "):
        Trainer(run_cfg(*DIGITS, "+callbacks.oops._target_=collections.OrderedDict"), run_dir).fit()
    assert read_results(run_dir)["status"] == "failed"
