"""Weights & Biases logging of a run (``logger=wandb``); wandb is imported only here, lazily.

Config and summary keys are flat so the dashboard's runs table, parallel
coordinates and scatter (``compute_reduction`` vs ``best_metric``) work unedited.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.run.schema import INTERRUPTED, higher_is_better, summary_of

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"optimizer": {"lr": 0.1}}}`` -> ``{"trainer.optimizer.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flat W&B config: short keys for the comparison axes plus every dotted key."""
    flat = flatten({key: value for key, value in cfg.items() if key != "layers"})
    flat.pop("model.paper_dataset", None)
    flat.update(
        model=cfg["model"]["name"], dataset=cfg["dataset"]["name"], sampler=cfg["sampler"]["name"],
        ratio=cfg["ratio"], seed=cfg["seed"], layers=cfg["layers"].get("name", "custom"),
        layer_rules=str(cfg["layers"].get("rules")),
    )
    return flat


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> tuple[str | None, str | None]:
    """(mode for ``wandb.init`` -- None lets ``WANDB_MODE`` decide --, a one-line hint or None)."""
    if os.environ.get("WANDB_MODE"):
        return None, None
    if mode != "auto":
        return mode, None
    if _api_key_configured():
        return "online", None
    return "offline", "W&B: no API key configured, logging offline; upload later with `wandb sync <run dir>/wandb/offline-run-*`"


class WandbCallback(Callback):
    """Logs a run to W&B: resolved flat config, tags, per-step and per-epoch metrics (the optimizer
    step is every row's step, and every row carries its epoch), the layer plan as a ``wandb.Table``
    and a summary holding the best metric and the ``results.json`` scalars. The run is always
    finished, as failed when the run fails."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, group: str | None, echo=print) -> None:
        import wandb

        self.wandb = wandb
        logger = cfg["logger"]
        mode, hint = resolve_mode(logger["mode"])
        if hint:
            echo(hint)
        tags = [f"model:{cfg['model']['name']}", f"dataset:{cfg['dataset']['name']}", f"sampler:{cfg['sampler']['name']}",
                f"ratio:{cfg['ratio']}", *logger["tags"]]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger["project"], entity=logger["entity"], group=logger["group"] or group,
            name=f"{cfg['model']['name']}-{cfg['dataset']['name']}-{cfg['sampler']['name']}-{cfg['ratio']}-s{cfg['seed']}",
            tags=tags, config=run_config(cfg), dir=str(run_dir), mode=mode, job_type="train", reinit="finish_previous",
        )

    def on_start(self, trainer: Trainer) -> None:
        assert trainer.plan is not None
        columns = ["layer", "type", "n", "k", "ratio", "policy", "exact_macs", "approx_macs", "note"]
        rows = [[r.name, r.type, r.n, r.k, r.ratio, r.policy, r.exact_macs.total, r.approx_macs.total, r.note]
                for r in trainer.plan.rows]
        metric = trainer.results.metric_name
        self.run.define_metric("test_metric", summary="max" if higher_is_better(metric) else "min")
        self.run.log({"layer_plan": self.wandb.Table(columns=columns, data=rows), "epoch": trainer.state.epoch},
                     step=trainer.state.step)
        self.run.summary.update({"planned_compute_reduction": trainer.plan.compute_reduction, "metric_name": metric})

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        self.run.log({"epoch": report.epoch, "train/loss": report.loss, "train/samples_per_s": report.samples_per_s,
                      "train/compute_reduction": report.compute_reduction}, step=report.step)

    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        self.run.log({"epoch": record.epoch, "test_metric": record.test_metric, "train_loss_epoch": record.train_loss,
                      "compute_reduction_epoch": record.compute_reduction, "epoch_time_s": record.time_s, "lr": record.lr},
                     step=record.step)

    def on_end(self, trainer: Trainer) -> None:
        """Finished, or interrupted by a signal: then marked preempting, so W&B shows it as preempted."""
        self.run.summary.update(summary_of(trainer.results))
        if trainer.results.status == INTERRUPTED:
            self.run.mark_preempting()
            self.run.finish(exit_code=1)
        else:
            self.run.finish()

    def on_failure(self, trainer: Trainer, message: str) -> None:
        self.run.summary.update(summary_of(trainer.results))
        self.run.finish(exit_code=1)
