"""The ``results.json`` contract: one definition of what a run records.

The trainer writes it, the W&B logger mirrors its scalars into the run summary, and
the compare tool reads it (from disk or from a W&B summary). Every key, status and
metric direction lives here and nowhere else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"

# What a run can be; ``running`` until it ends one way or another. ``interrupted``: stopped by
# SIGINT/SIGTERM at a step boundary with a checkpoint to continue from (``resume=``).
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)

# The metric each dataset kind is evaluated with, and which way is better.
ACCURACY, PERPLEXITY = "accuracy", "perplexity"
LOWER_IS_BETTER = frozenset({PERPLEXITY, "loss", "error"})


def higher_is_better(metric_name: str) -> bool:
    """Accuracy-like metrics grow, perplexity-like ones shrink."""
    return metric_name not in LOWER_IS_BETTER


def test_metric_key(metric_name: str) -> str:
    """The per-epoch test metric's name in a run's W&B history: ``test/accuracy``, ``test/perplexity``."""
    return f"test/{metric_name}"


def val_metric_key(metric_name: str) -> str:
    """The per-epoch validation metric's name in a run's W&B history: ``val/accuracy``, ``val/perplexity``."""
    return f"val/{metric_name}"


VALIDATION, TEST = "validation", "test"  # what a run's best epoch is chosen on (``selected_on``)


def selected_on(epochs: list[dict[str, Any]]) -> str:
    """``validation`` when the run's epochs record a validation metric, else ``test`` (no validation data)."""
    return VALIDATION if any(epoch.get("val_metric") is not None for epoch in epochs) else TEST


def best_epoch_record(epochs: list[dict[str, Any]], metric_name: str) -> dict[str, Any] | None:
    """The run's best epoch: the first with the best validation metric -- or, without validation
    data, test metric --, in the metric's direction; None before a finite one."""
    key = "val_metric" if selected_on(epochs) == VALIDATION else "test_metric"
    best: dict[str, Any] | None = None
    for epoch in epochs:
        value = epoch.get(key)
        if value is not None and improves(metric_name, value, None if best is None else best[key]):
            best = epoch
    return best


def improves(metric_name: str, value: float, best: float | None) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) in the metric's direction; a
    non-finite value (a diverged run) never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better(metric_name) else value < best


@dataclass
class EpochRecord:
    """One entry of ``results.json``'s ``epochs``: what an epoch did."""

    epoch: int  # its number, from 1
    step: int  # optimizer steps done at its end
    train_loss: float  # mean training loss over the epoch's steps
    test_metric: float  # the exact test metric at its end (``metric_name``)
    compute_reduction: float  # measured over this epoch's training steps
    time_s: float  # wall time of its training and evaluation
    step_time_s: float | None  # median training step
    lr: float  # the learning rate it trained with
    # the forward ratio in effect, averaged over its steps: the top-level ratio as the schedule set it (exact: 1.0)
    # (schedule=adaptive: the share of pairs the sampled layers kept, sum k / sum n)
    ratio: float | None = None
    layer_k: dict[str, int] | None = None  # each sampled layer's k at its end (when a schedule sets them)
    val_metric: float | None = None  # the exact validation metric at its end; None without validation data

@dataclass
class Results:
    """Everything ``results.json`` holds (docs/results.md is generated from these fields and comments)."""

    model: str  # the model's label: ``model.name``, with the arch or _target_ of a model brought along (``torchvision.resnet18``)
    dataset: str  # the dataset's name (``dataset.name``)
    sampler: str  # the sampler's name (``sampler.name``; ``exact`` for the baseline)
    ratio: float  # the top-level ``ratio``; 1.0 for exact training (sampler=exact ignores ``ratio``)
    seed: int  # the run's ``seed``
    layers_rule_set: str  # the layer rules' name (``layers.name``)
    metric_name: str = ACCURACY  # ``accuracy`` (a fraction) or ``perplexity``
    # running, finished, failed (``error`` says why, in one line) or interrupted (by SIGINT/SIGTERM/SIGUSR2 at
    # a step boundary, with a checkpoint to continue from; ``error`` says which signal at which step)
    status: str = RUNNING
    # the metric that chose the best epoch, at that epoch: the best exact validation metric, in the
    # metric's direction (written before validation splits, and still without validation data: the
    # best exact test metric, with ``selected_on: test``)
    best_metric: float | None = None
    best_epoch: int | None = None  # the epoch chosen on ``best_metric`` (the first of equals)
    test_metric_at_best: float | None = None  # the exact test metric at ``best_epoch``: the number to report
    selected_on: str | None = None  # what chose ``best_epoch``: ``validation``, or ``test`` without validation data
    final_metric: float | None = None  # the last epoch's exact test metric
    # the share of the Linear/Conv2d (and LSTM gate) MACs, forward and backward, saved against exact
    # training, counted from what really ran
    compute_reduction: float | None = None
    planned_compute_reduction: float | None = None  # what the plan expects (bernoulli varies around it)
    # the share of a training step's matrix-product and convolution FLOPs (forward and backward, counted
    # once at setup by torch's FlopCounterMode) that compute_reduction speaks of: the Linear/Conv2d/LSTM
    # layers' products; the rest (attention's Q·Kᵀ and weights·V, layers surgery does not know,
    # torch.nn.functional calls) is never sampled
    coverage: float | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch, below
    layers: list[dict[str, Any]] = field(default_factory=list)  # the plan: one row per layer, below
    # trainer.telemetry_every > 0: per sampled layer, every N steps (approxtrain.telemetry.LayerTelemetry rows)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0  # the run's wall time so far
    step_time_s: float | None = None  # median training step over the run
    steps: int = 0  # optimizer steps done
    device: str | None = None  # what it trained on: ``cpu``, ``cuda``, ``cuda:1``
    peak_memory_bytes: int | None = None  # CUDA: the most memory allocated; CPU: the process's peak RSS
    world_size: int = 1  # processes (ranks) trained on; dataset.batch_size is per process
    global_batch_size: int | None = None  # batch_size * world_size
    # data-parallel runs: the gradient bytes one rank all-reduced, {exact_bytes (DDP's full all-reduce),
    # actual_bytes (sent), reduction (the share saved)}
    communication: dict[str, Any] | None = None
    error: str | None = None  # one line, when failed (or interrupted: which signal, at which step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Results:
        """Build from a ``results.json`` mapping; unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


# Every key of results.json, in file order.
RESULT_KEYS = tuple(f.name for f in fields(Results))
EPOCH_KEYS = tuple(f.name for f in fields(EpochRecord))
# The scalar keys: what W&B's run summary mirrors.
SUMMARY_KEYS = tuple(key for key in RESULT_KEYS if key not in ("epochs", "layers", "telemetry"))
# The keys that say which epoch is chosen and what it scored: they change as epochs end.
BEST_EPOCH_KEYS = ("best_epoch", "best_metric", "test_metric_at_best", "selected_on")


def summary_of(results: Results | dict[str, Any]) -> dict[str, Any]:
    """What W&B's run summary mirrors of ``results``: every :data:`SUMMARY_KEYS` key (missing ones as None)."""
    values = results.to_dict() if isinstance(results, Results) else results
    return {key: values.get(key) for key in SUMMARY_KEYS}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged metric is recorded as null
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def results_text(results: Results | dict[str, Any]) -> str:
    """The JSON text of ``results`` (non-finite floats as null)."""
    values = results.to_dict() if isinstance(results, Results) else results
    return json.dumps(_json_safe(values), indent=2)


def results_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / RESULTS_FILE


def read_results(run_dir: Path | str) -> dict[str, Any] | None:
    """The ``results.json`` of ``run_dir`` as a mapping, or None when there is none; ``ValueError``
    (one line naming the file) when it is no JSON object (truncated, damaged, written by hand)."""
    path = results_path(run_dir)
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is damaged ({(str(error).splitlines() or [type(error).__name__])[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(values).__name__}, not the object approxtrain writes)")
    return values
