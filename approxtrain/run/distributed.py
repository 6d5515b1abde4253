"""Data-parallel runs on ``torch.distributed``: the ranks, their process groups and what they exchange.

One run, ``world_size`` processes (ranks), each training on its shard of every global batch
(``dataset.batch_size`` per rank). Rank 0 -- the process Hydra runs the job in -- *leads*:
it sends each job (the resolved config and the run dir) to the other ranks, which *follow*
(:func:`follow`), and it alone writes ``results.json``, checkpoints, W&B and the console.
The ranks come from one of:

* ``trainer.devices=N``: the job spawns ranks 1..N-1 on this node (:func:`lead`);
* ``torchrun``: ranks > 0 follow from the command line, one job after another (a sweep);
* SLURM through Hydra's submitit launcher (``tasks_per_node``): every task runs the job;
  tasks > 0 follow.

Two groups: a ``gloo`` *control* group (jobs are sent on it; waits up to
:data:`HANDSHAKE_TIMEOUT`) and, per job, the *training* group (``trainer.distributed.backend``,
``trainer.distributed.timeout_s``: a dead or stuck rank fails the run within it).

Per step (:class:`Distributed`): with ``selection=global`` each approximated layer's input
norms are all-reduced before its pairs are selected (every rank keeps the same pairs; the
run trains as one process on the global batch); ``weights`` scores by the weights alone
(no communication in forward); ``local`` selects on each rank's own batch. Gradients are
all-reduced inside DDP's buckets by :class:`GradientAllReduce`, which with
``sampled_allreduce`` sends only the kept slices of the approximated weights' gradients
and counts the bytes sent.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from approxtrain.config import lookup
from approxtrain.functional import PairScoring
from approxtrain.modules import ApproxConv2d, ApproxLinear

log = logging.getLogger("approxtrain")

ALLREDUCES = ("full", "sampled", "bf16")  # full: DDP's own all-reduce; bf16: torch's bf16_compress_hook
# How long the ranks wait for each other outside training: for a job to be sent, for the others to join.
HANDSHAKE_TIMEOUT = timedelta(minutes=30)
_JOIN_TIMEOUT_S = 30.0  # spawned ranks: how long the leader waits for them to exit after a run


# ---------------------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Launch:
    """Where this process sits among the ranks a launcher started (``world_size`` 1: none did)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | slurm | spawn

    @property
    def persistent(self) -> bool:
        """Whether the ranks outlive one job (torchrun: rank 0 may run a sweep's jobs one by one)."""
        return self.launcher in ("torchrun", "env")


def launched() -> Launch:
    """The ranks ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` env), a ``trainer.devices``
    spawn, or a submitit SLURM job with several tasks put this process in."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("APPROXTRAIN_LAUNCHER", "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), launcher)
    if env.get("SUBMITIT_EXECUTOR") == "slurm" and int(env.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        slurm = TorchDistributedEnvironment().export()  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for env://
        os.environ["APPROXTRAIN_LAUNCHER"] = "slurm"  # (what the next call finds, with RANK and WORLD_SIZE)
        return Launch(slurm.rank, slurm.world_size, slurm.local_rank, "slurm")
    return Launch()


def _start_control_group(launch: Launch, timeout: timedelta = HANDSHAKE_TIMEOUT) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: ``nccl`` for CUDA, ``gloo`` otherwise."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


def training_device(trainer: Mapping[str, Any], launch: Launch | Distributed) -> torch.device:
    """This rank's device: ``trainer.device``, with CUDA's index the rank's on its node."""
    from approxtrain.run.device import resolve_device

    device = resolve_device(trainer["device"])
    if device.type == "cuda" and launch.world_size > 1:
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _training_group(cfg: Mapping[str, Any], launch: Launch) -> Any:
    trainer = cfg["trainer"]
    backend = resolve_backend(lookup(trainer, "distributed.backend"), training_device(trainer, launch))
    return dist.new_group(backend=backend, timeout=timedelta(seconds=lookup(trainer, "distributed.timeout_s")))


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


_FOLLOWER = "import sys; from approxtrain.run.distributed import follow; sys.exit(follow())"


def _stop(ranks: list[subprocess.Popen], failed: bool) -> None:
    for process in ranks:
        if failed:
            process.terminate()
        try:
            process.wait(_JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def lead(cfg: Mapping[str, Any], run_dir: Path | str) -> Iterator[Distributed]:
    """Rank 0's side of one job: start (``trainer.devices > 1``) or join the other ranks, send them
    the job, and yield the :class:`Distributed` to train with; one process: no group at all."""
    launch, devices = launched(), lookup(cfg, "trainer.devices", 1)
    if launch.world_size > 1 and devices != 1:
        raise ValueError(f"trainer.devices={devices} is invalid under {launch.launcher} (its {launch.world_size} ranks "
                         "are the devices); allowed: trainer.devices=1")
    ranks: list[subprocess.Popen] = []
    if isinstance(devices, int) and devices > 1:  # (a bad value is left to the trainer's validation)
        gpus = torch.cuda.device_count()
        if lookup(cfg, "trainer.device") != "cpu" and 0 < gpus < devices:
            raise ValueError(f"trainer.devices={devices} is invalid: this node has {gpus} GPU(s); allowed: 1 to {gpus}, "
                             "or trainer.device=cpu")
        ranks = _spawn(devices)
        launch = Launch(0, devices, 0, "spawn")
    if launch.world_size == 1:
        yield Distributed.of(cfg, launch)
        return
    failed = True
    try:
        _start_control_group(launch, timedelta(seconds=lookup(cfg, "trainer.distributed.timeout_s")))  # the others join
        _send((dict(cfg), str(run_dir)))
        yield Distributed.of(cfg, launch, _training_group(cfg, launch))
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
    from approxtrain.run.trainer import RunInterrupted, Trainer, failure_message

    launch = launch or launched()
    _start_control_group(launch)
    try:
        while (job := _send(None)) is not None:
            cfg, run_dir = job
            distributed = Distributed.of(cfg, launch, _training_group(cfg, launch))
            Trainer(cfg, run_dir, dist=distributed).fit()
    except RunInterrupted as interrupt:  # every rank stopped at the same step; rank 0 says so
        return 128 + interrupt.signal_number
    except Exception as error:  # noqa: BLE001 - rank 0 records the run's failure; here one line
        print(f"approxtrain rank {launch.rank}: error: {failure_message(error)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------- a run's ranks


@dataclass
class Distributed:
    """This rank in a run: reductions over the ranks, the layers' pair scoring and the DDP wrapper.

    ``world_size`` 1 is a one-process run (every reduction is the identity); ``selection=weights``
    still scores pairs by the weights alone there."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # the training process group
    selection: str = "global"
    allreduce: str = "full"
    hook: GradientAllReduce | None = None
    device: torch.device = torch.device("cpu")  # where the reductions' tensors live (set by :meth:`wrap`)

    @classmethod
    def of(cls, cfg: Mapping[str, Any], launch: Launch = Launch(), group: Any = None) -> Distributed:
        settings = lookup(cfg, "trainer.distributed") or {}
        selection = settings.get("selection", "global")
        sampled = settings.get("sampled_allreduce", "auto")
        sampled = selection != "local" if sampled == "auto" else sampled
        return cls(launch.rank, launch.world_size, launch.local_rank, group, selection, "sampled" if sampled else "full")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in place)."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the ranks (in place)."""
        return self.sum(t).div_(self.world_size) if self.world_size > 1 else t

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a stop request: every rank stops at the same step)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def _input_norms(self, norms: Tensor) -> Tensor:
        """The norms of the global batch's input slices from this rank's: ``sqrt(sum over ranks of norm^2)``."""
        squares = norms.float().square()
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt_().to(norms.dtype)

    def attach(self, model: nn.Module) -> dict[nn.Parameter, PairScoring]:
        """Give every approximated layer of ``model`` its :class:`PairScoring` (none where the default
        -- local scores on one process -- holds); returns them by weight."""
        if self.selection == "weights":
            scoring = lambda: PairScoring(weights_only=True)  # noqa: E731
        elif self.selection == "global" and self.world_size > 1:
            scoring = lambda: PairScoring(reduce_input=self._input_norms)  # noqa: E731
        elif self.world_size > 1:
            scoring = PairScoring
        else:
            return {}
        layers = [module for module in model.modules() if isinstance(module, (ApproxLinear, ApproxConv2d))]
        for layer in layers:
            layer.scoring = scoring()
        return {layer.weight: layer.scoring for layer in layers}

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DDP with :class:`GradientAllReduce` as its comm hook (one process: ``model``);
        sets the layers' pair scoring either way."""
        scorings = self.attach(model)
        self.device = device
        if self.world_size == 1:
            return model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  process_group=self.group)
        self.hook = GradientAllReduce(self.group, self.allreduce, scorings if self.allreduce == "sampled" else {})
        ddp.register_comm_hook(self.hook, _comm_hook)
        return ddp

    def communication(self) -> Communication:
        """Gradient bytes this rank sent since the start (zero on one process)."""
        return self.hook.sent if self.hook is not None else Communication()


# ---------------------------------------------------------------------------------------------- gradients


@dataclass
class Communication:
    """Gradient bytes one rank all-reduced: what DDP's full all-reduce would send and what was sent."""

    exact_bytes: int = 0
    actual_bytes: int = 0

    @property
    def reduction(self) -> float:
        """Share of the bytes saved, ``(exact - actual) / exact`` (as the compute reduction is said)."""
        return (self.exact_bytes - self.actual_bytes) / self.exact_bytes if self.exact_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"exact_bytes": self.exact_bytes, "actual_bytes": self.actual_bytes, "reduction": self.reduction}


def _comm_hook(state, bucket):  # (no annotations: DDP checks them against its own types)
    return state.reduce(bucket)


@dataclass
class GradientAllReduce:
    """DDP comm-hook state: averages each bucket over the ranks, asynchronously (overlapped with the
    rest of backward), and counts the bytes.

    ``mode``: ``full`` (DDP's default all-reduce), ``bf16`` (torch's ``bf16_compress_hook``) or
    ``sampled``: the gradient of an approximated layer's weight is zero outside the input
    features / channels its forward kept (on every rank, when they keep the same ones), so only
    those slices (dim 1) are packed, all-reduced and unpacked; everything else goes in full.
    ``scorings`` maps a weight to its layer's :class:`PairScoring`, whose ``kept`` it reads and clears.
    """

    group: Any
    mode: str = "full"
    scorings: dict[nn.Parameter, PairScoring] = field(default_factory=dict)
    sent: Communication = field(default_factory=Communication)

    def __post_init__(self) -> None:
        for scoring in self.scorings.values():
            scoring.kept = []

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer = bucket.buffer()
        self.sent.exact_bytes += buffer.numel() * buffer.element_size()
        if self.mode == "bf16":
            self.sent.actual_bytes += buffer.numel() * torch.finfo(torch.bfloat16).bits // 8
            return default_hooks.bf16_compress_hook(self.group, bucket)
        if self.mode == "full" or not any(parameter in self.scorings for parameter in bucket.parameters()):
            self.sent.actual_bytes += buffer.numel() * buffer.element_size()
            return default_hooks.allreduce_hook(self.group, bucket)
        return self._sampled(bucket)

    def _kept(self, parameter: Tensor) -> Tensor | None:
        """The input features / channels ``parameter``'s gradient may be non-zero at (None: all)."""
        scoring = self.scorings.get(parameter)
        if scoring is None or not scoring.kept:
            return None
        kept = scoring.kept[0] if len(scoring.kept) == 1 else torch.cat(scoring.kept).unique()
        scoring.kept = []
        return None if kept.numel() >= parameter.shape[1] else kept

    def _sampled(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer, parameters = bucket.buffer(), bucket.parameters()
        gradients = _bucket_views(buffer, parameters)
        keeps = [self._kept(parameter) for parameter in parameters]
        packed = torch.cat([(g if keep is None else g.index_select(1, keep)).reshape(-1) for g, keep in zip(gradients, keeps)])
        packed.div_(dist.get_world_size(self.group))
        self.sent.actual_bytes += packed.numel() * packed.element_size()

        def unpack(future: torch.futures.Future) -> Tensor:
            reduced, offset = future.value()[0], 0
            for g, keep in zip(gradients, keeps):
                shape = g.shape if keep is None else (g.shape[0], keep.numel(), *g.shape[2:])
                part = reduced[offset:offset + math.prod(shape)].view(shape)
                offset += part.numel()
                if keep is None:
                    g.copy_(part)
                else:
                    g.index_copy_(1, keep, part)
            return buffer

        return dist.all_reduce(packed, group=self.group, async_op=True).get_future().then(unpack)


def _bucket_views(buffer: Tensor, parameters: list[Tensor]) -> list[Tensor]:
    """Each parameter's gradient as a view of the bucket's flat ``buffer``: laid out one after the
    other, each with its parameter's strides (as DDP's reducer lays them out)."""
    views, offset = [], buffer.storage_offset()
    for parameter in parameters:
        strides = parameter.stride() if _dense(parameter) else torch.empty(parameter.shape).stride()
        views.append(buffer.as_strided(parameter.shape, strides, offset))
        offset += parameter.numel()
    return views


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span exactly once, in some order of its dims."""
    span = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size > 1 and stride != span:
            return False
        span *= size
    return True
