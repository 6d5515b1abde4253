"""Data-parallel training (``approxtrain.run.distributed``): sharding, the pair-scoring seam, the
sampled all-reduce comm hook, and 2-rank gloo runs on the CPU against one process on the global batch.

Every multi-process run is bounded: rank 0 trains in a thread joined with a timeout, and the ranks'
collectives time out after ``timeout_s``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from approxtrain.data.order import EpochShuffle, derived_seed
from approxtrain.data.text import TokenBatches
from approxtrain.extras import MissingExtra
from approxtrain.functional import PairScoring, approx_linear
from approxtrain.modules import ApproxLinear, approx_conv1d
from approxtrain.run.checkpoint import load_checkpoint
from approxtrain.run.distributed import Distributed, GradientAllReduce, SlicedGradient, _comm_hook
from approxtrain.run.launch import Launch, launched, lead
from approxtrain.run.rundir import checkpoint_path
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import RANK_STREAM, Trainer
from approxtrain.sampling import SamplingConfig
from byo_nets import HFConv1D
from conftest import approxtrain_command

RUN_TIMEOUT_S = 240  # a whole 2-rank test run; a hung rank fails the test after this
# digits: 1437 training images. 2 ranks x 100 (or one process x 200), 3 steps: the batches are whole.
DIGITS = ("model=mlp", "dataset=digits", "trainer.max_steps=3", "trainer.distributed.timeout_s=60")


def train(cfg: dict, run_dir: Path) -> dict:
    """Train ``cfg`` (``trainer.devices`` ranks: this process is rank 0) into ``run_dir``; the final model state."""
    outcome: dict = {}

    def rank0() -> None:
        try:
            with lead(cfg, run_dir) as distributed:
                outcome["results"] = Trainer(cfg, run_dir, dist=distributed).fit()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=rank0, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive(), f"the {cfg['trainer']['devices']}-rank run hung for {RUN_TIMEOUT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["results"].status == "finished"
    return load_checkpoint(checkpoint_path(run_dir))["model"]


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"parameter {name} differs")


# ---------------------------------------------------------------------------------------------- one process


def test_epoch_shuffle_shards_are_the_one_process_order():
    one = [index for _, index in EpochShuffle(10, seed=3)]
    ranks = [[index for _, index in EpochShuffle(10, seed=3, rank=r, world_size=2)] for r in range(2)]
    assert [len(EpochShuffle(11, 3, r, 2)) for r in range(2)] == [6, 6]  # padded to equal shares
    assert sorted(ranks[0] + ranks[1]) == sorted(one) and ranks[0] == one[0::2] and ranks[1] == one[1::2]
    resumed = EpochShuffle(10, seed=3, rank=1, world_size=2)
    resumed.set_epoch(1, start=2)
    assert [index for _, index in resumed] == ranks[1][2:]


def test_token_batches_shard_rows():
    tokens = torch.arange(4 * 11)
    whole = TokenBatches(tokens, 4, 3)
    halves = [TokenBatches(tokens, 4, 3).shard(rank, 2) for rank in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        TokenBatches(tokens, 3, 3).shard(0, 2)


def test_pair_scoring_seam():
    torch.manual_seed(0)
    x, w = torch.randn(8, 6), torch.randn(4, 6)
    x[:, 0] *= 100  # the input's largest column; the weight's largest column is another
    w[:, 5] *= 100
    config = SamplingConfig("topk", ratio=0.5)
    by_input = PairScoring(kept=[])
    approx_linear(x, w, None, config, scoring=by_input)
    by_weights = PairScoring(weights_only=True, kept=[])
    approx_linear(x, w, None, config, scoring=by_weights)
    assert 0 in by_input.kept[0].tolist() and 5 in by_input.kept[0].tolist()
    assert torch.equal(by_weights.kept[0], torch.topk(w.norm(dim=0), 3).indices.sort().values)
    doubled = PairScoring(reduce_input=lambda norms: norms * 0 + 1, kept=[])  # every input column alike
    approx_linear(x, w, None, config, scoring=doubled)
    assert torch.equal(doubled.kept[0], by_weights.kept[0])


@pytest.fixture
def slurm_task(monkeypatch):
    """This process as task 3 of a 4-task SLURM job submitted by submitit (no torchrun variables)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
             "TORCHELASTIC_RUN_ID", "APPROXTRAIN_LAUNCHER", "SUBMITIT_EXECUTOR")
    for name in names:  # (set, then removed: each is restored as it was after the test)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert launched() == Launch()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for name, value in dict(SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_JOB_ID="4242",
                            SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_NODEID="1").items():
        monkeypatch.setenv(name, value)


def test_a_slurm_job_without_the_slurm_extra_is_one_line(slurm_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(MissingExtra) as raised:
        launched()
    assert str(raised.value) == 'a SLURM job with several tasks needs the slurm extra: pip install "approxtrain[slurm]"'


@pytest.mark.extra("slurm")
def test_ranks_come_from_torchrun_or_a_submitit_slurm_job(slurm_task, monkeypatch):
    slurm = Launch(rank=3, world_size=4, local_rank=1, launcher="slurm")
    assert launched() == slurm and os.environ["MASTER_ADDR"] == "node1" and launched() == slurm
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.delenv("APPROXTRAIN_LAUNCHER")
    assert launched() == Launch(3, 4, 1, "torchrun") and launched().persistent and not slurm.persistent


@pytest.fixture
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_sampled_allreduce_sends_the_kept_columns_only(one_rank_group):
    """One rank: the hook's result is the plain gradient, and it sends the kept columns' bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(ApproxLinear(40, 30, sampling=SamplingConfig("topk", ratio=0.25)), nn.ReLU(), nn.Linear(30, 5))
    reference = nn.Sequential(*(module for module in model))  # the same parameters, no DDP
    x = torch.randn(16, 40)
    scoring = PairScoring(kept=None)
    model[0].scoring = scoring
    reference_grads = torch.autograd.grad(reference(x).square().sum(), list(reference.parameters()))
    assert Distributed(allreduce="sampled").wrap(model, torch.device("cpu")) is model  # one process: no DDP
    hook = GradientAllReduce(one_rank_group, "sampled", {model[0].weight: SlicedGradient(scoring, 1)})
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(hook, _comm_hook)
    ddp(x).square().sum().backward()
    for parameter, expected in zip(model.parameters(), reference_grads):
        torch.testing.assert_close(parameter.grad, expected)
    full = sum(p.numel() for p in model.parameters()) * 4
    assert hook.sent.exact_bytes == full
    assert hook.sent.actual_bytes == full - 30 * 30 * 4  # 10 of 40 input columns of the 30x40 weight sent
    assert scoring.kept == []  # read and cleared


def test_sampled_allreduce_of_a_transformers_conv1d_sends_its_kept_rows(one_rank_group):
    """A transformers Conv1D stores its weight (n, out): its kept input features are rows (dim 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), approx_conv1d(HFConv1D(nf=30, nx=40), SamplingConfig("topk", ratio=0.25)))
    reference = nn.Sequential(*(module for module in model))
    x = torch.randn(16, 8)
    sliced = Distributed(selection="weights").attach(model)
    assert [(parameter is model[2].weight, dim) for parameter, (_, dim) in sliced.items()] == [(True, 0)]
    reference_grads = torch.autograd.grad(reference(x).square().sum(), list(reference.parameters()))
    hook = GradientAllReduce(one_rank_group, "sampled", sliced)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(hook, _comm_hook)
    ddp(x).square().sum().backward()
    for parameter, expected in zip(model.parameters(), reference_grads):
        torch.testing.assert_close(parameter.grad, expected)
    assert hook.sent.exact_bytes - hook.sent.actual_bytes == 30 * 30 * 4  # 10 of the 40 rows of the 40x30 weight sent


def test_sampled_allreduce_is_refused_with_local_selection(run_cfg, run_dir):
    cfg = run_cfg("trainer.distributed.selection=local", "trainer.distributed.sampled_allreduce=true")
    with pytest.raises(ValueError, match="trainer.distributed.sampled_allreduce=true is invalid with trainer.distributed.selection=local"):
        Trainer(cfg, run_dir).fit()


# ---------------------------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize("sampler", ["exact", "topk"])
def test_two_ranks_train_as_one_process_on_the_global_batch(run_cfg, tmp_path, sampler):
    two = train(run_cfg(*DIGITS, f"sampler={sampler}", "trainer.devices=2", "dataset.batch_size=100"), tmp_path / "two")
    one = train(run_cfg(*DIGITS, f"sampler={sampler}", "dataset.batch_size=200"), tmp_path / "one")
    assert_same_model(two, one)
    results = read_results(tmp_path / "two")
    assert results["world_size"] == 2 and results["global_batch_size"] == 200 and results["steps"] == 3
    if sampler == "topk":
        assert results["communication"]["reduction"] > 0.3


DROPOUT_PROBE = ("model=custom", "model._target_=byo_nets.DropoutProbe", "+model.in_channels=${dataset_info:in_channels}",
                 "+model.num_classes=${dataset_info:num_classes}")


def test_each_rank_draws_its_own_dropout_masks(run_cfg, tmp_path, monkeypatch):
    """Under trainer.devices=2 each rank's default stream (dropout) is seeded by (seed, rank), so the
    ranks' masks differ; the samplers' generator stays shared (the global-batch tests above). An exact
    run records the ratio it trains with, 1.0."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DROPOUT_PROBE_DIR", str(tmp_path))
    cfg = run_cfg(*DIGITS, *DROPOUT_PROBE, "layers=all", "sampler=exact", "ratio=0.5", "seed=3", "trainer.devices=2",
                  "dataset.batch_size=100")
    train(cfg, tmp_path / "run")
    probes = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    masks = [probe["mask"] for probe in probes]
    assert masks[0].shape == masks[1].shape == (100, 64)
    assert (masks[0] == masks[1]).float().mean() < 0.6  # independent masks agree at about half the positions
    assert [probe["seed"] for probe in probes] == [derived_seed(3, RANK_STREAM, rank) for rank in (0, 1)]
    results = read_results(tmp_path / "run")
    assert results["ratio"] == 1.0 and [epoch["ratio"] for epoch in results["epochs"]] == [1.0]


@pytest.mark.slow
def test_adaptive_ratios_decide_alike_on_every_rank(run_cfg, tmp_path):
    """schedule=adaptive scores through the layer's own scoring: with selection=global each rank decides
    the k of the global batch, so 2 ranks train as one process on it (local scores would make the
    ranks' k, and so their gradient slices, differ)."""
    common = (*DIGITS, "sampler=topk", "schedule=adaptive", "schedule.budget=0.3", "schedule.interval=step")
    two = train(run_cfg(*common, "trainer.devices=2", "dataset.batch_size=100"), tmp_path / "two")
    one = train(run_cfg(*common, "dataset.batch_size=200"), tmp_path / "one")
    assert_same_model(two, one)
    assert read_results(tmp_path / "two")["epochs"][-1]["layer_k"] == read_results(tmp_path / "one")["epochs"][-1]["layer_k"]


def test_telemetry_of_two_ranks_is_the_global_batch_s(run_cfg, tmp_path):
    """Telemetry under DDP: the discarded share (global scores) and the gradient cosine (both
    gradients averaged over the ranks) are those of one process on the global batch."""
    common = (*DIGITS, "sampler=topk", "ratio=0.3", "trainer.telemetry_every=1")
    train(run_cfg(*common, "trainer.devices=2", "dataset.batch_size=100"), tmp_path / "two")
    train(run_cfg(*common, "dataset.batch_size=200"), tmp_path / "one")
    two, one = (read_results(tmp_path / name)["telemetry"] for name in ("two", "one"))
    assert len(two) == len(one) == 3 * 3  # 3 steps x 3 sampled layers
    for row_two, row_one in zip(two, one):
        assert (row_two["step"], row_two["layer"], row_two["k"]) == (row_one["step"], row_one["layer"], row_one["k"])
        assert row_two["discarded_share"] == pytest.approx(row_one["discarded_share"], rel=1e-4)
        assert row_two["grad_cosine"] == pytest.approx(row_one["grad_cosine"], abs=1e-4)


@pytest.mark.slow
def test_weights_selection_equals_one_process_scoring_by_weights(run_cfg, tmp_path):
    common = (*DIGITS, "sampler=topk", "trainer.distributed.selection=weights")
    two = train(run_cfg(*common, "trainer.devices=2", "dataset.batch_size=100"), tmp_path / "two")
    one = train(run_cfg(*common, "dataset.batch_size=200"), tmp_path / "one")
    by_inputs = train(run_cfg(*DIGITS, "sampler=topk", "dataset.batch_size=200"), tmp_path / "inputs")
    assert_same_model(two, one)
    assert not torch.allclose(one["fc1.weight"], by_inputs["fc1.weight"])  # the scores did change the run


def test_sampled_allreduce_equals_full_and_sends_what_the_ratio_predicts(run_cfg, tmp_path):
    common = (*DIGITS, "sampler=topk", "ratio=0.25", "trainer.devices=2", "dataset.batch_size=100")
    sampled = train(run_cfg(*common), tmp_path / "sampled")
    full = train(run_cfg(*common, "trainer.distributed.sampled_allreduce=false"), tmp_path / "full")
    assert_same_model(sampled, full)
    results, full_results = read_results(tmp_path / "sampled"), read_results(tmp_path / "full")
    parameter_bytes = sum(t.numel() for t in full.values()) * 4
    unsent = sum((row["n"] - row["k"]) * full[f"{row['name']}.weight"].shape[0] for row in results["layers"]) * 4
    assert results["communication"]["exact_bytes"] == 3 * parameter_bytes
    assert results["communication"]["actual_bytes"] == 3 * (parameter_bytes - unsent)
    assert full_results["communication"] == {"exact_bytes": 3 * parameter_bytes, "actual_bytes": 3 * parameter_bytes, "reduction": 0.0}


@pytest.mark.slow
def test_resume_continues_a_two_rank_run_exactly(run_cfg, tmp_path):
    common = ("model=mlp", "dataset=digits", "sampler=topk", "trainer.devices=2", "dataset.batch_size=100",
              "trainer.distributed.timeout_s=60")
    whole = train(run_cfg(*common, "trainer.epochs=2"), tmp_path / "whole")
    train(run_cfg(*common, "trainer.epochs=1"), tmp_path / "split")
    resumed = run_cfg(*common, "trainer.epochs=2", f"resume={tmp_path / 'split'}")
    assert_same_model(train(resumed, tmp_path / "split"), whole)
    split, uninterrupted = read_results(tmp_path / "split"), read_results(tmp_path / "whole")
    assert [e["train_loss"] for e in split["epochs"]] == pytest.approx([e["train_loss"] for e in uninterrupted["epochs"]], rel=1e-5)
    assert split["communication"] == uninterrupted["communication"]


# ---------------------------------------------------------------------------------------------- the CLI

CLI_RUN = ("trainer.devices=2", "trainer.device=cpu", "model=mlp", "dataset=digits", "sampler=topk", "ratio=0.5",
           "logger=none", "trainer.num_workers=0")


def test_cli_two_devices_writes_one_results_json(cli, tmp_path):
    done = cli(*CLI_RUN, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2 and results["global_batch_size"] == 100
    communication = results["communication"]
    assert communication["actual_bytes"] < communication["exact_bytes"] and 0.3 < communication["reduction"] < 0.5
    assert [path.name for path in tmp_path.iterdir()] == ["run"]  # one run dir


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_dir(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "approxtrain.cli.train",
               *CLI_RUN[1:], "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["status"] == "finished" and results["world_size"] == 2 and results["communication"]["reduction"] > 0.3
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def test_a_killed_rank_fails_the_run_within_the_timeout(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([*approxtrain_command(), *CLI_RUN, "trainer.epochs=200", "trainer.distributed.timeout_s=20",
                                f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "results.json").exists() and time.monotonic() < deadline:  # epoch 1 trained by both ranks
            time.sleep(0.5)
        rank1 = [pid for pid in _children(process.pid) if b"follow()" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(rank1) == 1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    assert time.monotonic() - killed < 60
    assert process.returncode == 1
    results = read_results(run_dir)
    assert results["status"] == "failed" and "\n" not in results["error"] and results["epochs"]
    assert stderr.strip().splitlines()[-1] == f"approxtrain: error: {results['error']}"
    assert not math.isnan(results["epochs"][0]["test_metric"])


@pytest.mark.slow
def test_bench_distributed_counts_the_sampled_bytes(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "scripts/bench_distributed.py", "--models", "mlp", "--batch", "4", "--warmup", "0",
                           "--steps", "1", "--json", str(out)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    rows = {row["config"]: row for row in json.loads(out.read_text())["rows"]}
    full = rows["exact/full"]["exact_bytes"]
    assert rows["exact/full"]["actual_bytes"] == full and rows["exact/bf16"]["actual_bytes"] == full // 2
    assert rows["topk/sampled"]["actual_bytes"] == rows["topk/sampled/weights"]["actual_bytes"] < 0.55 * full
    assert rows["topk/sampled"]["score_bytes"] > 0 == rows["topk/sampled/weights"]["score_bytes"]
    assert rows["topk/sampled"]["score_allreduce_s"] > 0 == rows["topk/sampled/weights"]["score_allreduce_s"]
    assert rows["topk/sampled"]["speedup_10gbps"] > 0
