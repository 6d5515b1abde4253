"""``approxtrain``: the Hydra app that trains one configuration (or a sweep of them).

    approxtrain model=wrn sampler=topk ratio=0.5
    approxtrain -m sampler=exact,topk,nps ratio=0.3,0.5 model=mlp dataset=digits logger=none

Before Hydra runs, the command line is checked (group options, then the whole
composition) so that a mistake is one line and exit code 2. A failing job is recorded
(``results.json`` with ``status: failed`` and the one-line error, W&B run finished as
failed); in a sweep the other jobs go on, and when the sweep ends its comparison table
is printed and the jobs' ``results.json`` statuses decide the exit code -- the same
under every launcher (basic, joblib, submitit), since it is read from disk in the
process that launched them.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (stores the config nodes made from code before anything is composed)
from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.run.schema import FINISHED, read_results

log = logging.getLogger("approxtrain")
CONFIG_PACKAGE = "approxtrain.configs"
CONFIG_NAME = "train"
GROUPS = ("model", "dataset", "sampler", "layers", "logger", "experiment", "trainer")
# Exit codes: 0 finished; RUN_FAILED a run (or a sweep's job) failed, recorded in its results.json;
# USAGE_ERROR the command line cannot be composed (nothing ran); 128 + N stopped by signal N
# (130 SIGINT, 143 SIGTERM) at a step boundary, with a checkpoint to continue from.
RUN_FAILED = 1
USAGE_ERROR = 2

# hydra.run.dir: a resumed run keeps writing into the run dir it continues
if not OmegaConf.has_resolver("resume_dir"):
    OmegaConf.register_new_resolver("resume_dir", lambda resume, default: resume if resume else default)


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


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """The overrides of one job of the sweep they describe (``ratio=0.3,0.5`` -> ``ratio=0.3``); sweeps
    without a list of values (``interval(...)``, for the Optuna sweeper) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    single = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            single.append(override.input_line)
            continue
        try:
            value = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - not a list-like sweep: nothing to pick
            continue
        single.append(f"{override.get_key_element()}={value}")
    return single


def composition_error(args: list[str]) -> str | None:
    """Compose the config the command line asks for, as Hydra will, and return the reason it
    cannot be composed in one line (None when it can). A sweep is checked through its first job."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit:
        return None  # argparse's own usage error: Hydra reports it
    if parsed.help or parsed.hydra_help or parsed.shell_completion or parsed.info:
        return None
    search_path = create_config_search_path(f"pkg://{CONFIG_PACKAGE}")
    if parsed.config_dir is not None:
        search_path.prepend("command-line", f"file://{os.path.abspath(parsed.config_dir)}")
    try:
        overrides = _first_of_each_sweep(parsed.overrides) if parsed.multirun else parsed.overrides
        Hydra.create_main_hydra2(task_name=CONFIG_NAME, config_search_path=search_path).compose_config(
            parsed.config_name or CONFIG_NAME, overrides, run_mode=RunMode.RUN)
    except Exception as error:  # noqa: BLE001 - every composition error becomes one line
        return composition_error_line(str(error), args)
    finally:
        GlobalHydra.instance().clear()
    return None


def _config_keys(path: str, args: list[str]) -> list[str] | None:
    """The keys under ``path`` (top level for ``""``) of the config the group choices in ``args`` compose, or None."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    choices = [arg for arg in args if "=" in arg and arg.partition("=")[0].lstrip("+") in GROUPS and "," not in arg]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=choices)
        node = OmegaConf.select(cfg, path) if path else cfg
    except Exception:  # noqa: BLE001 - e.g. an option from --config-dir: no list rather than a wrong one
        return None
    return sorted(str(key) for key in node.keys()) if isinstance(node, DictConfig) else None


def composition_error_line(text: str, args: list[str]) -> str:
    """One line for Hydra's reason not to compose the config.

    An override of a key that does not exist names the key, its value and the keys
    allowed there; any other message is folded into one line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    match = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if match:
        key = match.group(1)
        value = next((arg.partition("=")[2] for arg in args if arg.partition("=")[0].removeprefix("override ").strip() == key), "...")
        parent = key.rpartition(".")[0]
        keys = _config_keys(parent, args)
        where = f"allowed under {parent}: " if parent else "allowed: "
        allowed = f"; {where}{', '.join(keys)}" if keys else ""
        return f"{key}={value} is not a config key{allowed} (to add a new key: +{key}={value})"
    return "; ".join(lines) if lines else "Hydra could not compose the config"


def _run_group() -> str | None:
    """The W&B group of this run: the sweep's (``sweep-<dir name>``), else the experiment's name."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"sweep-{Path(hydra_cfg.sweep.dir).name}"
    return None


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name=CONFIG_NAME)
def _app(cfg: DictConfig) -> float | None:
    """One job: train, recording a failure in the run's ``results.json`` (and W&B) as one line."""
    from rich.console import Console

    from approxtrain.cli.console import ConsoleCallback, print_config
    from approxtrain.run.trainer import RunInterrupted, Trainer

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    console = Console()
    trainer = Trainer(container, run_dir, [ConsoleCallback(console)])
    try:
        print_config(console, container, run_dir)
        if container["logger"]["name"] == "wandb":
            from approxtrain.cli.wandb_logger import WandbCallback

            trainer.callbacks.append(WandbCallback(container, run_dir, _run_group() or container["experiment_name"], console.print))
        results = trainer.fit()
    except RunInterrupted as interrupt:  # checkpointed and recorded: say how to continue, exit as the signal asks
        print(f"approxtrain: {interrupt}", file=sys.stderr)
        raise SystemExit(128 + interrupt.signal_number) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, like a kill
        print(f"approxtrain: stopped at once by a second SIGINT; {run_dir} keeps its last completed epoch", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as error:  # recorded (fit records its own failures), then reported as one line
        message = trainer.results.error if trainer.results.error is not None else trainer.record_failure(error)
        log.debug("run failed", exc_info=True)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            return None
        print(f"approxtrain: error: {message}", file=sys.stderr)
        raise SystemExit(RUN_FAILED) from None
    log.info("finished: best %s %s, compute reduction %.4f", results.metric_name, results.best_metric, results.compute_reduction)
    return results.best_metric


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[str]:
    """One line per job of the sweep in ``sweep_dir`` that did not finish (its ``results.json``
    says so, or it has none), among the job dirs written since ``since`` (a time stamp)."""
    lines = []
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml"), key=lambda path: path.stat().st_mtime):
        job_dir = hydra_yaml.parent.parent
        if hydra_yaml.stat().st_mtime < since:
            continue  # a job of an earlier sweep into the same dir
        job = OmegaConf.load(hydra_yaml).hydra.job
        results = read_results(job_dir)
        if results is None:
            lines.append(f"job {job.num} ({job.override_dirname}): no results.json (died before it started training)")
        elif results.get("status") != FINISHED:
            lines.append(f"job {job.num} ({job.override_dirname}): {results.get('error') or results.get('status')}")
    return lines


class SweepEndCallback(HydraCallback):
    """When a sweep ends (in the launching process): prints the comparison table of its runs,
    then lists the jobs that did not finish and exits non-zero if there are any."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file time stamps may be coarser than the clock

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from approxtrain.compare import print_sweep_table
        except ImportError:  # the comparison package is optional for training
            pass
        else:
            print_sweep_table(sweep_dir)
        failures = failed_jobs(sweep_dir, self.started)
        if failures:
            print(f"approxtrain: {len(failures)} job(s) failed:", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            raise SystemExit(RUN_FAILED)


def main() -> None:
    """Console entry point: checks the command line (one-line errors, exit 2), then runs Hydra.

    ``HYDRA_FULL_ERROR=1`` skips the composition check, so Hydra shows its full trace.
    """
    args = sys.argv[1:]
    error = check_group_overrides(args)
    if error is None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        error = composition_error(args)
    if error:
        print(f"approxtrain: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)
    _app()


def entry() -> None:
    """The ``approxtrain`` console script: :func:`main` with the CPU allocator told to keep freed memory."""
    retain_freed_memory()
    main()


if __name__ == "__main__":
    entry()
