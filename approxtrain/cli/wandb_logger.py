"""Weights & Biases logging of a run (``logger=wandb``); wandb is imported only here, lazily.

Config and summary keys are flat so the dashboard's runs table, parallel
coordinates and scatter (``compute_reduction`` vs ``best_metric``) work unedited.
W&B never stalls or ends the training: online W&B that cannot reach its server within
``logger.init_timeout_s`` logs offline instead, and a W&B error later only ends the logging.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from approxtrain.config import check_logger
from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.run.schema import INTERRUPTED, higher_is_better, summary_of
from approxtrain.run.trainer import failure_message
from approxtrain.telemetry import telemetry_scalars

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer

log = logging.getLogger("approxtrain")


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
    for key in ("model.paper_dataset", "model.module", "model.paper_rules"):  # where it comes from; layer_rules has the rules used
        flat.pop(key, None)
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


def _answers(url: str, timeout_s: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as error:
        return isinstance(error.reason, ssl.SSLError)
    except Exception:  # noqa: BLE001 - reset, timed out, not HTTP: no answer
        return False
    return True


def reachable(url: str, timeout_s: float) -> bool:
    """Whether a server answers HTTP at ``url`` within ``timeout_s`` seconds, name lookup included.

    Any answer counts (an error status, a certificate W&B may still accept); the
    environment's proxy variables apply, as they do for W&B."""
    answers: list[bool] = []
    done = threading.Event()

    def probe() -> None:
        answers.append(_answers(url, timeout_s))
        done.set()

    threading.Thread(target=probe, name="wandb-reachable", daemon=True).start()
    return done.wait(timeout_s) and answers[0]


def _online_requested_by(mode: str) -> str:
    """Who asked for online W&B, for the fallback line."""
    if os.environ.get("WANDB_MODE"):
        return f" (WANDB_MODE={os.environ['WANDB_MODE']})"
    return " (logger.mode=online)" if mode == "online" else ""


def open_run(wandb: Any, mode: str, timeout_s: float, **init_args: Any) -> Any:
    """``wandb.init`` that never stalls or aborts the training.

    Online W&B (``mode``, or ``WANDB_MODE`` which wins) that cannot reach its server within
    ``timeout_s`` seconds, or fails to start, logs offline instead, saying so in one line.
    Returns the run, or None when W&B cannot log at all (one warning; training goes on)."""
    resolved, hint = resolve_mode(mode)
    if hint:
        log.info(hint)
    if resolved == "online" or resolved is None and os.environ.get("WANDB_MODE") == "online":
        return _open_online(wandb, resolved, timeout_s, init_args, _online_requested_by(mode))
    try:
        return wandb.init(mode=resolved, **init_args)
    except Exception as error:  # noqa: BLE001
        log.warning("W&B: cannot start (%s); training goes on without W&B", failure_message(error))
        return None


def _open_online(wandb: Any, mode: str | None, timeout_s: float, init_args: Mapping[str, Any], requested_by: str) -> Any:
    url = "the W&B server"
    try:
        url = wandb.setup().settings.base_url
        if reachable(url, timeout_s):
            return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout_s), **init_args)
        reason = f"cannot reach {url} within {timeout_s:g} s"
    except Exception as error:  # noqa: BLE001 - whatever stops online W&B, offline still logs
        reason = f"no online run at {url} ({failure_message(error)})"
    return _open_offline(wandb, reason + requested_by, init_args)


def _open_offline(wandb: Any, reason: str, init_args: Mapping[str, Any]) -> Any:
    try:
        run = wandb.init(mode="offline", **init_args)
    except Exception as error:  # noqa: BLE001
        log.warning("W&B: %s; offline logging failed too (%s); training goes on without W&B", reason, failure_message(error))
        return None
    where = run.settings.sync_dir
    log.warning("W&B: %s; logging offline to %s (upload later with `wandb sync %s`)", reason, where, where)
    return run


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """A W&B hook whose W&B error ends the logging (one warning), never the training."""

    @functools.wraps(hook)
    def guarded(self: WandbCallback, *args: Any) -> None:
        if self.run is None:
            return
        try:
            hook(self, *args)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B: %s failed (%s); training goes on without W&B", hook.__name__, failure_message(error))
            self.run = None

    return guarded


class WandbCallback(Callback):
    """Logs a run to W&B: resolved flat config, tags, per-step and per-epoch metrics (the optimizer
    step is every row's step, and every row carries its epoch), the layer plan as a ``wandb.Table``
    and a summary holding the best metric and the ``results.json`` scalars. The run is always
    finished, as failed when the run fails. W&B errors never reach the training (:func:`open_run`)."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, group: str | None) -> None:
        import wandb

        check_logger(cfg)
        self.wandb = wandb
        logger = cfg["logger"]
        tags = [f"model:{cfg['model']['name']}", f"dataset:{cfg['dataset']['name']}", f"sampler:{cfg['sampler']['name']}",
                f"ratio:{cfg['ratio']}", *logger["tags"]]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = open_run(
            wandb, logger["mode"], logger["init_timeout_s"],
            project=logger["project"], entity=logger["entity"], group=logger["group"] or group,
            name=f"{cfg['model']['name']}-{cfg['dataset']['name']}-{cfg['sampler']['name']}-{cfg['ratio']}-s{cfg['seed']}",
            tags=tags, config=run_config(cfg), dir=str(run_dir), job_type="train", reinit="finish_previous",
        )

    @_never_raises
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
        self.telemetry_logged = len(trainer.state.telemetry)

    @_never_raises
    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        self.run.log({"epoch": report.epoch, "train/loss": report.loss, "train/samples_per_s": report.samples_per_s,
                      "train/compute_reduction": report.compute_reduction,
                      **telemetry_scalars(trainer.state.telemetry[self.telemetry_logged:])}, step=report.step)
        self.telemetry_logged = len(trainer.state.telemetry)

    @_never_raises
    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        self.run.log({"epoch": record.epoch, "test_metric": record.test_metric, "train_loss_epoch": record.train_loss,
                      "compute_reduction_epoch": record.compute_reduction, "epoch_time_s": record.time_s, "lr": record.lr,
                      "ratio": record.ratio},
                     step=record.step)

    @_never_raises
    def on_end(self, trainer: Trainer) -> None:
        """Finished, or interrupted by a signal: then marked preempting, so W&B shows it as preempted."""
        self.run.summary.update(summary_of(trainer.results))
        if trainer.results.status == INTERRUPTED:
            self.run.mark_preempting()
            self.run.finish(exit_code=1)
        else:
            self.run.finish()

    @_never_raises
    def on_failure(self, trainer: Trainer, message: str) -> None:
        self.run.summary.update(summary_of(trainer.results))
        self.run.finish(exit_code=1)
