"""Weights & Biases logging of a run (``logger=wandb``); wandb is imported only here, lazily.

The W&B run mirrors the run dir: the config nested as Hydra composed it, every history row at
its optimizer step (with its ``epoch``), metrics named by what they are (``train/loss``,
``test/accuracy`` or ``test/perplexity``, ``val/accuracy`` or ``val/perplexity``), the ``results.json``
scalars in the summary (the best epoch -- chosen on validation -- and its test metric after every epoch), the
``.hydra`` files and ``results.json`` saved with the run, and ``last.pt``/``best.pt`` as a
``model`` artifact. ``resume=`` continues the same W&B run (its id is kept in the run dir).
W&B never stalls or ends the training: ``logger.init_timeout_s`` bounds the run's W&B network time,
start and finish together. Online W&B that cannot reach its server or start a run within it logs
offline instead, with no network from then on; finishing an online run gets what start left of it
(the unsent data stays in the run dir for ``wandb sync``); a W&B error later only ends the logging.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from approxtrain.models.custom import with_dataset_facts
from approxtrain.run.callbacks import Callback, StepReport
from approxtrain.run.config_keys import flatten, model_label
from approxtrain.run.errors import failure_message
from approxtrain.run.rundir import BEST_CHECKPOINT, checkpoint_path
from approxtrain.run.schema import BEST_EPOCH_KEYS, INTERRUPTED, higher_is_better, summary_of, test_metric_key, val_metric_key
from approxtrain.spec import logger_spec
from approxtrain.telemetry import telemetry_scalars

if TYPE_CHECKING:
    from approxtrain.run.schema import EpochRecord
    from approxtrain.run.trainer import Trainer

log = logging.getLogger("approxtrain")


# Where the model comes from, not what the run is (layers.rules holds the rules used).
MODEL_PROVENANCE = ("paper_dataset", "module", "paper_rules")
# The W&B run's id, kept in the run dir so that ``resume=`` continues the same W&B run.
RUN_ID_FILE = Path("wandb") / "run_id"
# The run's record saved with the W&B run (relative to the run dir).
RUN_FILES = (".hydra/*.yaml", "results.json")
# Seconds an online run may take to finish when start used up the W&B time budget (logger.init_timeout_s).
MIN_FINISH_S = 1.0


def run_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B config: the resolved config, nested as Hydra composed it (``model.name``, ``sampler.name``,
    ``ratio``, ``seed``, ``layers.name``, ... each once), without where the model comes from."""
    config = dict(cfg)
    config["model"] = {key: value for key, value in cfg["model"].items() if key not in MODEL_PROVENANCE}
    return config


def is_exact(cfg: Mapping[str, Any]) -> bool:
    """Whether the run trains exactly (its ``ratio`` means nothing then)."""
    return cfg["sampler"]["name"] == "exact"


def _model(cfg: Mapping[str, Any]) -> str:
    """The model's label (``torchvision.resnet18``, ``byo_nets.SmallConvNet``: :func:`model_label`)."""
    return model_label(flatten(cfg["model"], "model.")) or "?"


def run_tags(cfg: Mapping[str, Any]) -> list[str]:
    """``model:``, ``dataset:``, ``sampler:`` and, for a sampled run, ``ratio:`` tags, then ``logger.tags``."""
    tags = [f"model:{_model(cfg)}", f"dataset:{cfg['dataset']['name']}", f"sampler:{cfg['sampler']['name']}"]
    if not is_exact(cfg):
        tags.append(f"ratio:{cfg['ratio']}")
    return [*tags, *cfg["logger"]["tags"]]


def run_name(cfg: Mapping[str, Any]) -> str:
    """``mlp-digits-topk-0.5-s0``; an exact run has no ratio in its name."""
    parts = [_model(cfg), cfg["dataset"]["name"], cfg["sampler"]["name"]]
    return "-".join([*parts, *([] if is_exact(cfg) else [str(cfg["ratio"])]), f"s{cfg['seed']}"])


def step_row(report: StepReport) -> dict[str, Any]:
    """A logging step's W&B row (logged at ``report.step``)."""
    return {"epoch": report.epoch, "train/loss": report.loss, "train/samples_per_s": report.samples_per_s,
            "train/compute_reduction": report.compute_reduction}


def epoch_row(record: EpochRecord, metric_name: str) -> dict[str, Any]:
    """An evaluated epoch's W&B row (logged at ``record.step``); the validation metric where there is validation data."""
    validation = {} if record.val_metric is None else {val_metric_key(metric_name): record.val_metric}
    return {"epoch": record.epoch, test_metric_key(metric_name): record.test_metric, **validation,
            "train/loss_epoch": record.train_loss, "train/compute_reduction_epoch": record.compute_reduction,
            "train/ratio": record.ratio, "train/lr": record.lr, "time/epoch_s": record.time_s, "time/step_s": record.step_time_s}


def stored_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run an earlier part of this run logged to, else None."""
    path = run_dir / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


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


def quiet_wandb_analytics() -> None:
    """Turn off wandb's own usage analytics (OpenTelemetry metrics about the SDK, not the run's data), which
    wandb posts to the configured server at exit outside any run timeout -- also after an offline fallback."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
    except ImportError:  # a wandb without them
        return
    opentelemetry_proxy.disable()


def open_run(wandb: Any, mode: str, timeout_s: float, **init_args: Any) -> Any:
    """``wandb.init`` that never stalls or aborts the training.

    Online W&B (``mode``, or ``WANDB_MODE`` which wins) that cannot reach its server within
    ``timeout_s`` seconds, or fails to start, logs offline instead, saying so in one line.
    Returns the run, or None when W&B cannot log at all (one warning; training goes on)."""
    quiet_wandb_analytics()
    resolved, hint = resolve_mode(mode)
    if hint:
        log.info(hint)
    if resolved == "online" or resolved is None and os.environ.get("WANDB_MODE") == "online":
        return _open_online(wandb, resolved, timeout_s, init_args, _online_requested_by(mode))
    try:
        return wandb.init(mode=resolved, **init_args)
    except Exception as error:  # noqa: BLE001 - W&B never ends a run: whatever fails, training goes on
        log.warning("W&B: cannot start (%s); training goes on without W&B", failure_message(error))
        return None


def _open_online(wandb: Any, mode: str | None, timeout_s: float, init_args: Mapping[str, Any], requested_by: str) -> Any:
    url = "the W&B server"
    started = time.monotonic()
    try:
        url = wandb.setup().settings.base_url
        if reachable(url, timeout_s):
            left_s = max(timeout_s - (time.monotonic() - started), MIN_FINISH_S)
            return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=left_s, finish_timeout=timeout_s), **init_args)
        reason = f"cannot reach {url} within {timeout_s:g} s"
    except Exception as error:  # noqa: BLE001 - whatever stops online W&B, offline still logs
        reason = f"no online run at {url} ({failure_message(error)})"
        end_service(wandb)
    return _open_offline(wandb, reason + requested_by, init_args)


def end_service(wandb: Any) -> None:
    """End wandb's service process, and with it what a failed online start left talking to the server (its
    analytics post to the server when the service ends); the offline run then starts a fresh one."""
    try:
        wandb.teardown()
    except (Exception, SystemExit):  # noqa: BLE001 - teardown exits with the service's status; the run goes on
        pass


def _open_offline(wandb: Any, reason: str, init_args: Mapping[str, Any]) -> Any:
    try:
        run = wandb.init(mode="offline", **init_args)
    except Exception as error:  # noqa: BLE001 - W&B never ends a run: whatever fails, training goes on
        log.warning("W&B: %s; offline logging failed too (%s); training goes on without W&B", reason, failure_message(error))
        return None
    where = run.settings.sync_dir
    log.warning("W&B: %s; logging offline to %s (upload later with `wandb sync %s`)", reason, where, where)
    return run


def finish_within(run: Any, seconds: float | None, exit_code: int = 0) -> bool:
    """``run.finish(exit_code)``, waiting at most ``seconds`` (None: as long as it takes); whether it finished.

    Finishing goes on in the background past the bound (wandb's own ``finish_timeout`` ends it); what it
    had not sent stays in the run's W&B dir, for ``wandb sync``."""
    if seconds is None:
        run.finish(exit_code=exit_code)
        return True
    errors: list[BaseException] = []

    def finish() -> None:
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(error)

    finishing = threading.Thread(target=finish, name="wandb-finish", daemon=True)
    finishing.start()
    finishing.join(seconds)
    if errors:
        raise errors[0]
    return not finishing.is_alive()


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """A W&B hook whose W&B error ends the logging (one warning), never the training."""

    @functools.wraps(hook)
    def guarded(self: WandbCallback, *args: Any) -> None:
        if self.run is None:
            return
        try:
            hook(self, *args)
        except Exception as error:  # noqa: BLE001 - a W&B error during training only ends the logging
            log.warning("W&B: %s failed (%s); training goes on without W&B", hook.__name__, failure_message(error))
            self.run = None

    return guarded


def wandb_callback(cfg: Mapping[str, Any], run_dir: Path, group: str | None) -> WandbCallback | None:
    """The W&B logger of a ``logger=wandb`` run; None, with a one-line hint, when wandb cannot be imported
    (the run goes on as with ``logger=none``)."""
    try:
        import wandb  # noqa: F401 - only whether it imports
    except ImportError as error:
        log.warning("W&B: cannot import wandb (%s); logging as logger=none (install it: pip install wandb)", error)
        return None
    return WandbCallback(cfg, run_dir, group)


class WandbCallback(Callback):
    """Logs a run to W&B (see the module's docstring): config, tags, a row per logging step and per
    epoch at its optimizer step, the layer plan as a ``wandb.Table``, the run's files and checkpoints,
    and a summary holding the ``results.json`` scalars. The run is always finished, as failed when the
    run fails. W&B errors never reach the training (:func:`open_run`)."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, group: str | None) -> None:
        import wandb

        logger = logger_spec(cfg["logger"]).fields
        self.wandb, self.run_dir = wandb, run_dir
        self.log_model = logger["log_model"]
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = stored_run_id(run_dir) if cfg["resume"] else None
        started = time.monotonic()
        self.run = open_run(
            wandb, logger["mode"], logger["init_timeout_s"],
            project=logger["project"], entity=logger["entity"], group=logger["group"] or group, name=run_name(cfg),
            tags=run_tags(cfg), config=run_config(cfg), dir=str(run_dir), job_type="train", reinit="finish_previous",
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        # The W&B time budget's remainder for finishing an online run (an offline run finishes on disk).
        self.finish_budget_s: float | None = None
        if self.run is not None and self.run.settings.mode == "online":
            self.finish_budget_s = max(logger["init_timeout_s"] - (time.monotonic() - started), MIN_FINISH_S)
        if self.run is not None:
            (run_dir / RUN_ID_FILE).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_ID_FILE).write_text(self.run.id)

    @_never_raises
    def on_start(self, trainer: Trainer) -> None:
        """The metrics' summaries -- the validation metric's best, the test metric's last (the test metric to
        report is ``test_metric_at_best``, at the epoch chosen on validation); the layer plan, once (a resumed run logged it)."""
        assert trainer.plan is not None
        metric = trainer.results.metric_name
        self.run.define_metric(val_metric_key(metric), summary="max" if higher_is_better(metric) else "min")
        self.run.define_metric(test_metric_key(metric), summary="last")
        self.run.summary.update({"planned_compute_reduction": trainer.plan.compute_reduction, "metric_name": metric})
        self.run.config.update({"model": with_dataset_facts(run_config(trainer.cfg)["model"], trainer.info)}, allow_val_change=True)
        self.telemetry_logged = len(trainer.state.telemetry)
        if trainer.state.step > 0:
            return
        columns = ["layer", "type", "n", "k", "ratio", "policy", "exact_macs", "approx_macs", "note"]
        rows = [[r.name, r.type, r.n, r.k, r.ratio, r.policy, r.exact_macs.total, r.approx_macs.total, r.note]
                for r in trainer.plan.rows]
        self.run.log({"layer_plan": self.wandb.Table(columns=columns, data=rows), "epoch": trainer.state.epoch},
                     step=trainer.state.step)

    @_never_raises
    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        new_telemetry = trainer.state.telemetry[self.telemetry_logged:]
        self.run.log({**step_row(report), **telemetry_scalars(new_telemetry)}, step=report.step)
        self.telemetry_logged += len(new_telemetry)

    @_never_raises
    def on_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        """The epoch's row; the best epoch so far and its test metric into the summary."""
        self.run.log(epoch_row(record, trainer.results.metric_name), step=record.step)
        self.run.summary.update({key: getattr(trainer.results, key) for key in BEST_EPOCH_KEYS})

    @_never_raises
    def on_end(self, trainer: Trainer) -> None:
        """Finished, or interrupted by a signal: then marked preempting, so W&B shows it as preempted."""
        self._record(trainer)
        if self.log_model:
            self._log_checkpoints(trainer)
        if trainer.results.status == INTERRUPTED:
            self.run.mark_preempting()
            self._finish(exit_code=1)
        else:
            self._finish()

    @_never_raises
    def on_failure(self, trainer: Trainer, message: str) -> None:
        self._record(trainer)
        self._finish(exit_code=1)

    def _finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run within what is left of the W&B time budget; past it, say where its data stays."""
        if not finish_within(self.run, self.finish_budget_s, exit_code):
            where = self.run.settings.sync_dir
            log.warning("W&B: finishing the run took over %.0f s (logger.init_timeout_s); what it did not upload stays in %s "
                        "(upload later with `wandb sync %s`)", self.finish_budget_s, where, where)
        self.run = None

    def _record(self, trainer: Trainer) -> None:
        """The ``results.json`` scalars into the summary; the run's ``.hydra`` files and ``results.json`` saved with it."""
        self.run.summary.update(summary_of(trainer.results))
        for pattern in RUN_FILES:
            if any(self.run_dir.glob(pattern)):
                self.run.save(str(self.run_dir / pattern), base_path=str(self.run_dir), policy="now")

    def _log_checkpoints(self, trainer: Trainer) -> None:
        """``last.pt`` and ``best.pt`` as a version of the ``model-<run id>`` artifact (``latest``)."""
        paths = [path for path in (checkpoint_path(self.run_dir), checkpoint_path(self.run_dir, BEST_CHECKPOINT)) if path.is_file()]
        if not paths:
            return
        results = trainer.results
        artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata={
            "metric_name": results.metric_name, "best_metric": results.best_metric, "epoch": trainer.state.epoch,
            "step": trainer.state.step, "compute_reduction": results.compute_reduction, "status": results.status})
        for path in paths:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest"])
