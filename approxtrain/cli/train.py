"""``approxtrain``: the Hydra app that trains one configuration (or a sweep of them).

    approxtrain model=wrn sampler=topk ratio=0.5
    approxtrain -m sampler=exact,topk,nps ratio=0.3,0.5 model=mlp dataset=digits logger=none

A failing job is recorded (``results.json`` with ``status: failed`` and the
one-line error, W&B run finished as failed); in a sweep the other jobs go on, and
the sweep ends with the comparison table of its runs.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

import approxtrain.cli.config_store  # noqa: F401  (stores the config nodes made from code before anything is composed)
from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.run.rundir import write_results
from approxtrain.run.schema import read_results

log = logging.getLogger("approxtrain")
CONFIG_PACKAGE = "approxtrain.configs"
GROUPS = ("model", "dataset", "sampler", "layers", "logger", "experiment", "trainer")

# hydra.run.dir: a resumed run keeps writing into the run dir it continues
if not OmegaConf.has_resolver("resume_dir"):
    OmegaConf.register_new_resolver("resume_dir", lambda resume, default: resume if resume else default)

_failed_jobs: list[str] = []


class _HeldStream:
    """Stands in for ``sys.stderr`` while Hydra composes the config: holds what is written
    until :meth:`release` (the first job starts), so that a composition error can be
    replaced by one line; passes everything through after that."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._held, self.holding = stream, io.StringIO(), True

    def write(self, text: str) -> int:
        return (self._held if self.holding else self._stream).write(text)

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self._stream.write(self._held.getvalue())

    def held(self) -> str:
        return self._held.getvalue()

    def discard(self) -> None:
        """Drop what is held (it was replaced by one line) and pass everything through from now on."""
        self.holding, self._held = False, io.StringIO()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_held_stderr: _HeldStream | None = None


def _options(group: str, config_dirs: list[str]) -> list[str]:
    """The options of a config group: shipped with the package or in the user's ``--config-dir``s."""
    from importlib.resources import files

    folders = [files(CONFIG_PACKAGE).joinpath(group), *(Path(folder) / group for folder in config_dirs)]
    return sorted({entry.name[:-5] for folder in folders if folder.is_dir() for entry in folder.iterdir() if entry.name.endswith(".yaml")})


def _config_dirs(args: list[str]) -> list[str]:
    dirs = []
    for index, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and index + 1 < len(args):
            dirs.append(args[index + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.partition("=")[2])
    return dirs


def check_group_overrides(args: list[str]) -> str | None:
    """A one-line error for ``group=option`` overrides naming an option that does not exist, else None.

    Sweep values (``sampler=topk,nps``) are checked one by one; options in ``--config-dir``
    count; with a ``hydra.searchpath`` override, and for sweep functions, Hydra decides.
    """
    if any(arg.startswith("hydra.searchpath") for arg in args):
        return None
    config_dirs = _config_dirs(args)
    for arg in args:
        if arg.startswith(("-", "+", "~", "hydra")) or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.removeprefix("override ").strip()
        if key not in GROUPS or "(" in value or value in ("", "null"):
            continue
        options = _options(key, config_dirs)
        for choice in value.split(","):
            if options and choice not in options and "/" not in choice:
                return f"{key}={choice} is unknown; allowed: {', '.join(options)}"
    return None


def _config_keys(path: str, args: list[str]) -> list[str] | None:
    """The keys under ``path`` (top level for ``""``) of the config the group choices in ``args`` compose, or None."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    choices = [arg for arg in args if "=" in arg and arg.partition("=")[0].lstrip("+") in GROUPS and "," not in arg]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
            cfg = compose("train", overrides=choices)
        node = OmegaConf.select(cfg, path) if path else cfg
    except Exception:  # e.g. an option from --config-dir: no list rather than a wrong one
        return None
    return sorted(str(key) for key in node.keys()) if isinstance(node, DictConfig) else None


def composition_error_line(text: str, args: list[str]) -> str:
    """One line for what Hydra printed when it could not compose the config.

    An override of a key that does not exist names the key, its value and the keys
    allowed there; any other message is folded into one line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    match = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if match:
        key = match.group(1)
        value = next((arg.partition("=")[2] for arg in args if arg.partition("=")[0].removeprefix("override ").strip() == key), "...")
        parent = key.rpartition(".")[0]
        keys = _config_keys(parent, args) if parent else _config_keys("", args)
        where = f"allowed under {parent}: " if parent else "allowed: "
        allowed = f"; {where}{', '.join(keys)}" if keys else ""
        return f"{key}={value} is not a config key{allowed} (to add a new key: +{key}={value})"
    return "; ".join(lines) if lines else "Hydra could not compose the config"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return message if isinstance(error, ValueError) else f"{type(error).__name__}: {message}"


def _sweep_group() -> str | None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"sweep-{Path(hydra_cfg.sweep.dir).name}"
    return None


def _select(cfg: DictConfig, key: str) -> Any:
    """A config value for the failure record, as plain JSON-able data (``ratio=[1,2]`` is a ListConfig)."""
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _record_failure(run_dir: Path, cfg: DictConfig, message: str, started_at: float) -> dict[str, Any] | None:
    """Mark this run failed in its ``results.json``.

    A ``results.json`` older than this process belongs to an earlier run (a failed
    ``resume=`` attempt): it is left untouched, so nothing already recorded is lost.
    """
    path = run_dir / "results.json"
    if path.exists() and path.stat().st_mtime < started_at:
        return None
    results = read_results(run_dir) or {
        "model": _select(cfg, "model.name"), "dataset": _select(cfg, "dataset.name"),
        "sampler": _select(cfg, "sampler.name"), "ratio": _select(cfg, "ratio"),
        "seed": _select(cfg, "seed"), "layers_rule_set": _select(cfg, "layers.name"),
        "epochs": [], "layers": [], "best_metric": None, "final_metric": None, "compute_reduction": None,
    }
    results.update(status="failed", error=message)
    write_results(run_dir, results)
    return results


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from approxtrain.cli.console import ConsoleReporter, print_config
    from approxtrain.training import train

    if _held_stderr is not None:
        _held_stderr.release()
    started_at = time.time()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    console = Console()
    wandb_reporter = None
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(container, dict)
        from approxtrain.config import validate

        validate(container)
        print_config(console, container, run_dir)
        reporters: list[Any] = [ConsoleReporter(console)]
        if container["logger"]["name"] == "wandb":
            from approxtrain.cli.wandb_logger import WandbReporter

            wandb_reporter = WandbReporter(container, run_dir, _sweep_group() or container.get("experiment_name"), console.print)
            reporters.append(wandb_reporter)
        results = train(container, run_dir, reporters)
        log.info("finished: best %s %s, compute reduction %.4f", results["metric_name"], results["best_metric"], results["compute_reduction"])
        return results["best_metric"]
    except Exception as error:  # recorded, then reported as one line
        message = _one_line(error)
        results = _record_failure(run_dir, cfg, message, started_at)
        if wandb_reporter is not None:
            wandb_reporter.fail(results, message)
        log.debug("run failed", exc_info=True)
        if multirun:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            _failed_jobs.append(f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname}): {message}")
            return None
        print(f"approxtrain: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


class SweepTableCallback(Callback):
    """Prints the comparison table of a sweep's runs when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from approxtrain.compare import print_sweep_table
        except ImportError:  # the comparison package is optional for training
            return
        print_sweep_table(Path(config.hydra.sweep.dir))


def main() -> None:
    """Console entry point: pre-checks group choices, runs Hydra, exits non-zero on failed jobs.

    What Hydra writes to stderr before the first job starts is held back: if it fails to
    compose the config (an unknown key, a malformed override), one line replaces it.
    """
    global _held_stderr
    args = sys.argv[1:]
    error = check_group_overrides(args)
    if error:
        print(f"approxtrain: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    real_stderr = sys.stderr
    _held_stderr = held = _HeldStream(real_stderr)
    sys.stderr = held  # type: ignore[assignment]
    try:
        _app()
    except SystemExit as exit_:
        if held.holding and exit_.code not in (0, None) and held.held().strip():
            line = composition_error_line(held.held(), args)
            held.discard()
            print(f"approxtrain: error: {line}", file=real_stderr)
            raise SystemExit(exit_.code) from None
        raise
    finally:
        held.release()
        sys.stderr = real_stderr
        _held_stderr = None
    if _failed_jobs:
        print(f"approxtrain: {len(_failed_jobs)} job(s) failed:", file=sys.stderr)
        for line in _failed_jobs:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)


def entry() -> None:
    """The ``approxtrain`` console script: :func:`main` in a process whose CPU allocator keeps freed memory."""
    retain_freed_memory()  # re-executes this command once (Linux); APPROXTRAIN_MALLOC=system opts out
    main()


if __name__ == "__main__":
    entry()
