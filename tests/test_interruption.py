"""Runs that survive preemption and mistakes: SIGTERM/SIGINT checkpoint at a step boundary and
resume equals the uninterrupted run (with loader workers); the data order depends on the seed and
the epoch only; a diverging run fails naming the step."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from approxtrain.run.callbacks import Callback
from approxtrain.run.checkpoint import load_checkpoint
from approxtrain.run.errors import RunInterrupted, TrainingDiverged
from approxtrain.run.rundir import checkpoint_path
from approxtrain.run.schema import improves, read_results
from approxtrain.run.trainer import Trainer
from conftest import approxtrain_command

# digits: 1437 training images less the validation tenth (144) = 1293, batch 50 -> 26 steps per epoch
DIGITS = ("model=mlp", "dataset=digits", "ratio=0.5", "trainer.epochs=2", "trainer.log_every_n_steps=1")


class SignalAt(Callback):
    """Sends ``signal_number`` to this process at optimizer step ``step``."""

    def __init__(self, step: int, signal_number: int = signal.SIGTERM) -> None:
        self.step, self.signal_number = step, signal_number

    def on_step(self, trainer, report):
        if report.step == self.step:
            os.kill(os.getpid(), self.signal_number)


def epoch_values(results: dict) -> list[tuple]:
    return [(e["epoch"], e["step"], e["lr"], e["train_loss"], e["test_metric"], e["compute_reduction"]) for e in results["epochs"]]


@pytest.mark.parametrize("sampler", ["nps", "bernoulli"])
def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(sampler, run_cfg, tmp_path):
    overrides = (*DIGITS, f"sampler={sampler}", "trainer.num_workers=2")
    uninterrupted = Trainer(run_cfg(*overrides), tmp_path / "a").fit().to_dict()
    stopped = tmp_path / "b"
    with pytest.raises(RunInterrupted, match="interrupted by SIGTERM at step 40") as interrupt:
        Trainer(run_cfg(*overrides), stopped, [SignalAt(40)]).fit()
    assert interrupt.value.signal_number == signal.SIGTERM
    on_disk = read_results(stopped)
    assert on_disk["status"] == "interrupted" and on_disk["steps"] == 40 and len(on_disk["epochs"]) == 1
    state = load_checkpoint(checkpoint_path(stopped))["state"]
    assert state["step"] == 40 and state["progress"]["batches"] == 14  # 14 batches into epoch 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run

    resumed = Trainer(run_cfg(*overrides, f"resume={stopped}"), stopped).fit().to_dict()
    assert resumed["status"] == "finished" and resumed["steps"] == uninterrupted["steps"] == 52
    assert epoch_values(resumed) == epoch_values(uninterrupted)
    assert resumed["compute_reduction"] == uninterrupted["compute_reduction"]


def test_data_order_depends_on_seed_and_epoch_not_on_workers(run_cfg, tmp_path):
    runs = [Trainer(run_cfg(*DIGITS, "sampler=exact", f"trainer.num_workers={workers}"), tmp_path / str(workers)).fit().to_dict()
            for workers in (0, 2)]
    assert epoch_values(runs[0]) == epoch_values(runs[1])
    other_seed = Trainer(run_cfg(*DIGITS, "sampler=exact", "seed=1"), tmp_path / "seed1").fit().to_dict()
    assert epoch_values(other_seed) != epoch_values(runs[0])


def test_diverging_run_fails_naming_the_step(run_cfg, run_dir):
    cfg = run_cfg("model=mlp", "dataset=digits", "trainer.optimizer.name=sgd", "trainer.optimizer.lr=1e6", "trainer.epochs=3")
    with pytest.raises(TrainingDiverged, match=r"non-finite training loss \(\w+\) by step 20, epoch 1"):
        Trainer(cfg, run_dir).fit()
    results = read_results(run_dir)
    assert results["status"] == "failed" and results["error"].startswith("non-finite training loss")
    assert results["epochs"] == [] and not (run_dir / "checkpoints").exists()  # nothing non-finite saved
    assert results["steps"] == 20  # the steps it did before failing (was 0: the last epoch's count)


def test_non_finite_metric_never_counts_as_best():
    assert not improves("accuracy", math.nan, None) and not improves("perplexity", math.inf, None)
    assert not improves("perplexity", math.nan, 100.0) and improves("perplexity", 99.0, 100.0)


def test_perplexity_overflow_is_inf(run_cfg, run_dir):
    trainer = Trainer(run_cfg("model=lstm", "dataset=synthetic", "dataset.num_samples=4", "dataset.batch_size=2",
                              "dataset.eval_batch_size=2", "dataset.seq_len=5", "model.hidden=16"), run_dir)
    trainer.setup()
    with torch.no_grad():  # finite but huge logits: a mean cross-entropy far beyond exp's range
        trainer.model.decoder.weight.mul_(1e6)
    assert trainer.evaluate() == math.inf


def test_cli_sigterm_leaves_an_interrupted_run_and_no_workers(tmp_path):
    run_dir = tmp_path / "run"
    command = [*approxtrain_command(), "model=mlp", "dataset=digits", "dataset.batch_size=10", "trainer.epochs=50",
               "logger=none", "trainer.num_workers=2", "trainer.device=cpu", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (read_results(run_dir) or {}).get("epochs") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1][-2000:]
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - sent < 20, "the run took too long to stop"
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("approxtrain: interrupted by SIGTERM at step ") and last.endswith(f"continue with resume={run_dir}")
    results = read_results(run_dir)
    assert results["status"] == "interrupted" and results["error"] in last
    assert load_checkpoint(checkpoint_path(run_dir))["state"]["step"] == results["steps"]
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_mentions(pid, str(run_dir))]
    assert not leftovers, f"processes of the run still alive: {leftovers}"


def _cmdline_mentions(pid: str, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_preemption_signal_checkpoints_then_hands_over_to_the_launchers_handler(run_cfg, run_dir):
    """submitit installs a SIGUSR2 handler that requeues the job: it must run after the checkpoint."""
    seen = []

    def launcher_handler(signal_number, frame):
        seen.append((read_results(run_dir)["status"], load_checkpoint(checkpoint_path(run_dir))["state"]["step"]))

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    try:
        with pytest.raises(RunInterrupted, match="interrupted by SIGUSR2 at step 5"):
            Trainer(run_cfg(*DIGITS, "sampler=topk"), run_dir, [SignalAt(5, signal.SIGUSR2)]).fit()
        assert signal.getsignal(signal.SIGUSR2) is launcher_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [("interrupted", 5)]


def test_one_sigint_is_an_interruption_not_a_second_sigint(run_cfg, run_dir):
    """Python's own SIGINT handler (KeyboardInterrupt) is not handed the signal: one Ctrl-C checkpoints and stops."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(RunInterrupted, match="interrupted by SIGINT at step 5"):
            Trainer(run_cfg(*DIGITS, "sampler=topk"), run_dir, [SignalAt(5, signal.SIGINT)]).fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert read_results(run_dir)["status"] == "interrupted"


def test_a_stop_with_the_last_step_leaves_a_finished_run(run_cfg, run_dir):
    """The stop is noticed between epochs; after the last epoch there is nothing to continue: finished, not interrupted."""
    results = Trainer(run_cfg(*DIGITS, "sampler=topk"), run_dir, [SignalAt(52)]).fit()  # 2 epochs x 26 steps
    assert results.status == "finished" and read_results(run_dir)["status"] == "finished" and results.steps == 52


def _pids_running(*texts: str) -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and all(_cmdline_mentions(pid, text) for text in texts)]


@pytest.mark.slow
@pytest.mark.extra("slurm")
def test_submitit_requeue_after_preemption_continues_the_job(cli, tmp_path):
    """docs/resume.md's SLURM recipe, on submitit's local executor: SIGUSR2 (the preemption warning)
    checkpoints the job mid-epoch, submitit requeues it, and the requeued job continues its run
    to the numbers of an uninterrupted one."""
    common = ("model=mlp", "dataset=digits", "dataset.batch_size=10", "trainer.epochs=3", "logger=none",
              "trainer.num_workers=0", "sampler=nps", "trainer.device=cpu")
    assert cli(*common, f"hydra.run.dir={tmp_path / 'uninterrupted'}").returncode == 0
    sweep_dir = tmp_path / "sweep"
    command = [*approxtrain_command(), "-m", "hydra/launcher=submitit_local", *common, f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (read_results(sweep_dir / "0") or {}).get("epochs") and time.monotonic() < deadline:
            time.sleep(0.2)
        jobs = _pids_running("submitit.core._submit", f"{sweep_dir}/.submitit")  # the task, not its controller
        assert len(jobs) == 1, jobs
        os.kill(jobs[0], signal.SIGUSR2)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "Requeued job" in log and "job 0 was requeued: continuing its run" in log
    resumed, uninterrupted = read_results(sweep_dir / "0"), read_results(tmp_path / "uninterrupted")
    assert resumed["status"] == "finished" and resumed["steps"] == uninterrupted["steps"] == 3 * 130  # 1293 images, batch 10
    assert epoch_values(resumed) == epoch_values(uninterrupted)
