"""Starting a run's processes (ranks) and deciding which of them lead and which follow.

One run, ``world_size`` processes, each training on its shard of every global batch
(``dataset.batch_size`` per rank). Rank 0 -- the process Hydra runs the job in -- *leads*
(:func:`lead`): it sends each job (the resolved config and the run dir) to the other ranks,
which *follow* (:func:`follow`), and it alone writes ``results.json``, checkpoints, W&B and the
console. The ranks come from one of:

* ``trainer.devices=N``: the job spawns ranks 1..N-1 on this node;
* ``torchrun``: ranks > 0 follow from the command line, one job after another (a sweep);
  they never run Hydra (:attr:`Launch.follows_from_the_start`);
* SLURM through Hydra's submitit launcher (``tasks_per_node``): every task runs the job;
  tasks > 0 follow from inside it (:attr:`Launch.follows`).

Two groups: a ``gloo`` *control* group (jobs are sent on it; waits up to
:data:`HANDSHAKE_TIMEOUT`) and, per job, the *training* group (``trainer.distributed.backend``,
``trainer.distributed.timeout_s``: a dead or stuck rank fails the run within it). What the
ranks do together inside a run is :class:`~approxtrain.run.distributed.Distributed`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from approxtrain.extras import require
from approxtrain.run.device import training_device
from approxtrain.run.distributed import Distributed, resolve_backend
from approxtrain.run.errors import RunInterrupted, failure_message
from approxtrain.run.trainer import Trainer
from approxtrain.spec import TrainerSpec, trainer_spec

# How long the ranks wait for each other outside training: for a job to be sent, for the others to join.
HANDSHAKE_TIMEOUT = timedelta(minutes=30)
_JOIN_TIMEOUT_S = 30.0  # spawned ranks: how long the leader waits for them to exit after a run


@dataclass(frozen=True)
class Launch:
    """Where this process sits among the ranks a launcher started (``world_size`` 1: none did)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | env | slurm | spawn

    @property
    def persistent(self) -> bool:
        """Whether the ranks outlive one job (torchrun: rank 0 may run a sweep's jobs one by one)."""
        return self.launcher in ("torchrun", "env")

    @property
    def follows(self) -> bool:
        """Whether this process follows rank 0's jobs instead of running one itself."""
        return self.rank > 0

    @property
    def follows_from_the_start(self) -> bool:
        """Whether this process follows without running Hydra at all (torchrun's ranks > 0); a SLURM
        task > 0 runs the job Hydra gives it and follows from there."""
        return self.follows and self.persistent


def launched() -> Launch:
    """The ranks ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` env), a ``trainer.devices``
    spawn, or a submitit SLURM job with several tasks put this process in."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("APPROXTRAIN_LAUNCHER", "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), launcher)
    if env.get("SUBMITIT_EXECUTOR") == "slurm" and int(env.get("SLURM_NTASKS", "1")) > 1:
        require("slurm", "a SLURM job with several tasks")
        from submitit.helpers import TorchDistributedEnvironment

        slurm = TorchDistributedEnvironment().export()  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for env://
        os.environ["APPROXTRAIN_LAUNCHER"] = "slurm"  # (what the next call finds, with RANK and WORLD_SIZE)
        return Launch(slurm.rank, slurm.world_size, slurm.local_rank, "slurm")
    return Launch()


def _start_control_group(launch: Launch, timeout: timedelta = HANDSHAKE_TIMEOUT) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout)


def _distributed(trainer: TrainerSpec, launch: Launch) -> Distributed:
    """This rank of a job: its training group (a new one per job) and the run's distributed settings."""
    device = training_device(trainer.device, launch.world_size, launch.local_rank)
    backend = resolve_backend(trainer.distributed.backend, device)
    group = dist.new_group(backend=backend, timeout=timedelta(seconds=trainer.distributed.timeout_s))
    return Distributed.of(trainer.distributed, launch.rank, launch.world_size, launch.local_rank, group)


def _send(job: tuple[dict[str, Any], str] | None) -> tuple[dict[str, Any], str] | None:
    message = [job]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(world_size: int) -> list[subprocess.Popen]:
    """Start ranks 1..world_size-1 on this node as followers (fresh interpreters: under any launcher,
    whatever its multiprocessing setup); this process becomes rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return [subprocess.Popen([sys.executable, "-c", _FOLLOWER],
                             env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                                  "APPROXTRAIN_LAUNCHER": "spawn"})
            for rank in range(1, world_size)]


_FOLLOWER = "import sys; from approxtrain.run.launch import follow; sys.exit(follow())"


def _stop(ranks: list[subprocess.Popen], failed: bool) -> None:
    for process in ranks:
        if failed:
            process.terminate()
        try:
            process.wait(_JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ranks_to_spawn(trainer: TrainerSpec, launch: Launch) -> int:
    """How many ranks this job starts itself (``trainer.devices``; 1: none), checked against the launcher and the GPUs."""
    devices = trainer.devices
    if launch.world_size > 1 and devices != 1:
        raise ValueError(f"trainer.devices={devices} is invalid under {launch.launcher} (its {launch.world_size} ranks "
                         "are the devices); allowed: trainer.devices=1")
    if devices == 1:
        return 1
    gpus = torch.cuda.device_count()
    if trainer.device != "cpu" and 0 < gpus < devices:
        raise ValueError(f"trainer.devices={devices} is invalid: this node has {gpus} GPU(s); allowed: 1 to {gpus}, "
                         "or trainer.device=cpu")
    return devices


@contextlib.contextmanager
def lead(cfg: Mapping[str, Any], run_dir: Path | str) -> Iterator[Distributed]:
    """Rank 0's side of one job: start (``trainer.devices > 1``) or join the other ranks, send them
    the job, and yield the :class:`Distributed` to train with; one process: no group at all. The
    ``trainer`` group is checked before anything is started (:class:`~approxtrain.checks.ConfigError`)."""
    launch, ranks, trainer = launched(), [], trainer_spec(cfg["trainer"])
    if (devices := _ranks_to_spawn(trainer, launch)) > 1:
        ranks = _spawn(devices)
        launch = Launch(0, devices, 0, "spawn")
    if launch.world_size == 1:
        yield Distributed.of(trainer.distributed)
        return
    failed = True
    try:
        _start_control_group(launch, timedelta(seconds=trainer.distributed.timeout_s))  # the others join
        _send((dict(cfg), str(run_dir)))
        yield _distributed(trainer, launch)
        failed = False
    finally:
        _end_job(launch, failed)
        _stop(ranks, failed)


def _end_job(launch: Launch, failed: bool) -> None:
    """After a job: a failed one tears the groups down (the followers' next collective fails at once);
    a finished one tells the followers there is no other job, unless the ranks outlive it (torchrun)."""
    if failed:
        if dist.is_initialized():
            dist.destroy_process_group()
    elif launch.persistent:
        atexit.register(_release_followers)
    else:
        _release_followers()


def _release_followers() -> None:
    if dist.is_initialized():
        _send(None)
        dist.destroy_process_group()


def follow(launch: Launch | None = None) -> int:
    """A rank > 0: run the jobs rank 0 sends until it says there are no more; returns the exit code
    (1 after a failed job, which also ends the ranks' group)."""
    launch = launch or launched()
    _start_control_group(launch)
    try:
        while (job := _send(None)) is not None:
            cfg, run_dir = job
            Trainer(cfg, run_dir, dist=_distributed(trainer_spec(cfg["trainer"]), launch)).fit()
    except RunInterrupted as interrupt:  # every rank stopped at the same step; rank 0 says so
        return 128 + interrupt.signal_number
    except Exception as error:  # noqa: BLE001 - rank 0 records the run's failure; here one line
        print(f"approxtrain rank {launch.rank}: error: {failure_message(error)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
