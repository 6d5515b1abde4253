"""What a run has done so far, and what it records: the state a checkpoint carries (:class:`TrainState`,
the random generators' states) and the ``results.json`` made from it (:class:`RunRecord`)."""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from approxtrain.accounting import compute_reduction
from approxtrain.run.distributed import Communication
from approxtrain.run.rundir import write_results
from approxtrain.run.schema import FAILED, VALIDATION, Results, best_epoch_record, selected_on

log = logging.getLogger("approxtrain")


@dataclass
class EpochProgress:
    """An epoch stopped at a step boundary (by a signal): what its record needs from the batches done."""

    batches: int = 0
    loss_sum: float = 0.0
    exact_macs: int = 0
    actual_macs: int = 0
    time_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    lr: float = 0.0  # the rate the epoch trains with

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochProgress:
        # (an earlier version kept the ratio's sum here; the ratio control's callback state holds it now)
        return cls(**{key: value for key, value in values.items() if key != "ratio_sum"})


@dataclass
class TrainState:
    """What a checkpoint must carry, beyond model/optimizer/RNG/callback states, to continue a run exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord dicts
    best_metric: float | None = None
    best_epoch: int | None = None  # the epoch best.pt holds
    exact_macs: int = 0
    actual_macs: int = 0
    wall_time_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    progress: EpochProgress | None = None  # the unfinished epoch epoch + 1, when stopped inside it
    telemetry: list[dict[str, Any]] = field(default_factory=list)  # LayerTelemetry rows (trainer.telemetry_every)
    exact_bytes: int = 0  # gradient bytes a full all-reduce would have sent (per rank)
    actual_bytes: int = 0  # gradient bytes sent (per rank)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        progress = values.get("progress")
        return cls(**{**values, "progress": EpochProgress.from_dict(progress) if progress else None})

    def count_bytes(self, sent: Communication) -> None:
        """Add the gradient bytes ``sent`` since the last count (and zero it)."""
        self.exact_bytes += sent.exact_bytes
        self.actual_bytes += sent.actual_bytes
        sent.exact_bytes = sent.actual_bytes = 0


def rank_rng_state(device: torch.device) -> dict[str, Any]:
    """The generators that are each rank's own under DDP: torch's default CPU and CUDA streams (dropout)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def rng_state(sampler: torch.Generator, device: torch.device, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every random generator a run draws from -- the samplers' own, torch's (CPU, CUDA), NumPy's,
    Python's -- as tensors and plain numbers, so a checkpoint is read with ``weights_only=True``;
    ``ranks``: every rank's :func:`rank_rng_state` in a multi-rank run."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"sampler": sampler.get_state(), **rank_rng_state(device),
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss_next": gauss_next},
            "ranks": ranks}


def set_rng_state(rng: dict[str, Any], sampler: torch.Generator, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
    """Continue every generator from :func:`rng_state`'s ``rng``, torch's streams from rank ``rank``'s own
    (a checkpoint without them, one-process or older: from the writing rank's)."""
    ranks = rng.get("ranks") or []
    rng = {**rng, **ranks[rank]} if len(ranks) == world_size else rng
    sampler.set_state(rng["sampler"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    numpy = rng["numpy"]
    np.random.set_state((numpy["name"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))


class RunRecord:
    """A run's ``results.json``: the :class:`Results` made from its :class:`TrainState`, written by the
    writing process once the run owns its dir (a resumed run: once its checkpoint has been read)."""

    def __init__(self, results: Results, run_dir: Path, *, writes: bool, owns_run_dir: bool) -> None:
        self.results, self.run_dir, self.writes, self.owns_run_dir = results, run_dir, writes, owns_run_dir

    def update(self, state: TrainState, world_size: int) -> None:
        """Bring the results up to ``state``."""
        results = self.results
        best, chosen_on = best_epoch_record(state.history, results.metric_name), selected_on(state.history)
        results.selected_on = chosen_on if state.history else None
        results.best_epoch = None if best is None else best["epoch"]
        results.best_metric = None if best is None else best["val_metric" if chosen_on == VALIDATION else "test_metric"]
        results.test_metric_at_best = None if best is None else best["test_metric"]
        results.final_metric = state.history[-1]["test_metric"] if state.history else None
        measured = state.exact_macs or state.step  # trained without a counted product: 0.0, not "not yet measured"
        results.compute_reduction = compute_reduction(state.exact_macs, state.actual_macs) if measured else None
        results.epochs = state.history
        results.telemetry = state.telemetry
        results.wall_time_s, results.steps = state.wall_time_s, state.step
        results.step_time_s = statistics.median(state.step_times) if state.step_times else None
        if world_size > 1:
            results.communication = Communication(state.exact_bytes, state.actual_bytes).to_dict()

    def write(self) -> None:
        if self.writes and self.owns_run_dir:
            write_results(self.run_dir, self.results)

    def end(self, status: str, error: str | None = None) -> None:
        """Record the run's end (``error``: its one line) and write it."""
        self.results.status, self.results.error = status, error
        self.write()

    def fail(self, message: str) -> None:
        """Record the failure ``message``; a ``results.json`` that cannot be written is said in a warning
        (this runs inside an ``except`` and must not raise)."""
        try:
            self.end(FAILED, message)
        except OSError as write_error:
            log.warning("the failure could not be recorded in %s: %s", self.run_dir, write_error)
