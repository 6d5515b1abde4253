"""``approxtrain``: the Hydra app that trains one configuration (or a sweep of them).

    approxtrain model=wrn sampler=topk ratio=0.5
    approxtrain -m sampler=exact,topk,nps ratio=0.3,0.5 model=mlp dataset=digits logger=none

Before Hydra runs, the command line is checked (group options, then the whole
composition) and the run dir is settled, so that a mistake is one line and exit code 2
and nothing is written: a new run gets a dir no other run has (``${unique_dir:...}``
in ``hydra.run.dir``/``hydra.sweep.dir``); an explicit ``hydra.run.dir`` (or
``hydra.sweep.dir``) that holds a run or that a live run holds is refused; ``resume=``
continues the run it names with that run's own config (:mod:`approxtrain.cli.resume`).
A run holds its dir (``.lock``) for its life. A failing job is recorded
(``results.json`` with ``status: failed`` and the one-line error, W&B run finished as
failed); in a sweep the other jobs go on, and when the sweep ends its comparison table
is printed and the jobs' ``results.json`` statuses decide the exit code -- the same
under every launcher (basic, joblib, submitit), since it is read from disk in the
process that launched them.
"""

from __future__ import annotations

import argparse
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
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (stores the config nodes made from code before anything is composed)
from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.cli.resume import RESUME_KEY, RecordResume, last_value, parse_overrides, requeued_run, resume_overrides
from approxtrain.extras import missing_cluster_line, missing_option_line
from approxtrain.run.rundir import checkpoint_path, claim_new_dir, hold, holder, recorded_run, release
from approxtrain.run.schema import FINISHED, read_results

log = logging.getLogger("approxtrain")
CONFIG_PACKAGE = "approxtrain.configs"
CONFIG_NAME = "train"
GROUPS = ("model", "dataset", "sampler", "layers", "logger", "experiment", "trainer", "search", "callbacks")
# Exit codes: 0 finished; RUN_FAILED a run (or a sweep's job) failed, recorded in its results.json;
# USAGE_ERROR the command line cannot be composed (nothing ran); 128 + N stopped by signal N
# (130 SIGINT, 143 SIGTERM) at a step boundary, with a checkpoint to continue from.
RUN_FAILED = 1
USAGE_ERROR = 2

# hydra.run.dir / hydra.sweep.dir: a new dir, claimed (created and held) by this process. Cached,
# and the cache travels with the config to a sweep's jobs (Hydra's load_sweep_config, pickling).
if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", claim_new_dir, use_cache=True)


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


def parse_args(args: list[str]) -> argparse.Namespace | None:
    """Hydra's reading of the command line, or None for one that composes nothing (argparse's own
    usage error, which Hydra reports; ``--help``, ``--info``, shell completion)."""
    from hydra._internal.utils import get_args_parser

    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit:
        return None
    if parsed.help or parsed.hydra_help or parsed.shell_completion or parsed.info:
        return None
    return parsed


def compose(parsed: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config ``overrides`` compose, as Hydra will compose it for the command line ``parsed``."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_config_search_path(f"pkg://{CONFIG_PACKAGE}")
    if parsed.config_dir is not None:
        search_path.prepend("command-line", f"file://{os.path.abspath(parsed.config_dir)}")
    try:
        return Hydra.create_main_hydra2(task_name=CONFIG_NAME, config_search_path=search_path).compose_config(
            parsed.config_name or CONFIG_NAME, overrides, run_mode=RunMode.RUN)
    finally:
        GlobalHydra.instance().clear()


def composition_error(args: list[str]) -> str | None:
    """Compose the config the command line asks for, as Hydra will, and return the reason it
    cannot be composed in one line (None when it can). A sweep is checked through its first job."""
    parsed = parse_args(args)
    if parsed is None:
        return None
    try:
        cfg = compose(parsed, _first_of_each_sweep(parsed.overrides) if parsed.multirun else parsed.overrides)
        OmegaConf.to_container(cfg.model, resolve=True)  # a model argument's ${...} (model=custom) fails here, not in the job
    except Exception as error:  # noqa: BLE001 - every composition error becomes one line
        from approxtrain.models.custom import dataset_fact_hint

        return missing_option_line(str(error)) or composition_error_line(str(error), args) + dataset_fact_hint(str(error))
    return missing_cluster_line(str(cfg.hydra.launcher.get("_target_", ""))) or objective_error(cfg)


def objective_error(cfg: DictConfig) -> str | None:
    """Why the composed config's ``objective`` (and, for ``ratio_within_margin``, ``search.*``) cannot be
    computed, in one line; None when it can -- checked before a sweep spends its trials."""
    from approxtrain.cli.objective import objective_names

    keys = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in ("objective", "search") if key in cfg}
    try:
        objective_names(keys)
    except ValueError as error:
        return str(error)
    return None


def settle_run_dir(args: list[str]) -> list[str]:
    """The command line to run, its run dir settled and held by this process: for ``resume=DIR`` the
    run's own command line (:func:`resumed_args`); an explicit ``hydra.run.dir`` (``hydra.sweep.dir``
    with ``-m``) as given. ``ValueError`` (one line) when the dir is held by a live run, holds a run
    (other than for ``resume=``) or cannot be resumed so; nothing is written then. The default dir
    is left to ``${unique_dir:...}``."""
    parsed = parse_args(args)
    if parsed is None or parsed.cfg:  # --cfg prints the config and runs nothing
        return args
    try:
        overrides = parse_overrides(parsed.overrides)
    except Exception:  # noqa: BLE001 - malformed (only reached with HYDRA_FULL_ERROR=1): Hydra reports it
        return args
    resume = last_value(overrides, RESUME_KEY)
    if resume is not None and resume.value() in (None, ""):
        resume = None
    target = resume or last_value(overrides, "hydra.sweep.dir" if parsed.multirun else "hydra.run.dir")
    if target is None or "${" in str(target.value()):
        return args  # the default dir (claimed by unique_dir) or one Hydra has to resolve: its jobs hold it
    run_dir = Path(str(target.value()))
    pid = holder(run_dir)
    if pid is not None:
        raise ValueError(f"{target.input_line}: the dir is held by a live run (pid {pid}); allowed: a dir no live run holds")
    if resume is not None:
        args = resumed_args(args, parsed, overrides, resume)
    elif (found := recorded_run(run_dir)) is not None:
        raise ValueError(f"{target.input_line}: the dir already holds a run ({found}); allowed: a new or empty dir"
                         + ("" if parsed.multirun else f", or resume={target.get_value_element_as_str()} to continue it"))
    hold(run_dir)
    return args


def resumed_args(args: list[str], parsed: argparse.Namespace, overrides: list[Override], resume: Override) -> list[str]:
    """The command line that continues the run ``resume`` names: its saved overrides with the command
    line's on top (:func:`~approxtrain.cli.resume.resume_overrides`), run in its dir without Hydra
    rewriting its ``.hydra`` files (:class:`~approxtrain.cli.resume.RecordResume` does, once the
    checkpoint is restored). ``ValueError`` (one line) when it cannot be continued so."""
    if parsed.multirun:
        raise ValueError(f"{resume.input_line}: resume continues one run; it cannot be part of a sweep (-m)")
    if last_value(overrides, "hydra.run.dir") is not None:
        raise ValueError(f"{resume.input_line}: the run continues in its own dir; leave out hydra.run.dir")
    try:
        merged = resume_overrides(resume, [o for o in overrides if not o.is_hydra_override()],
                                  lambda overrides: compose(parsed, overrides))
    except ValueError as error:
        raise ValueError(f"{resume.input_line}: {str(error).removeprefix('resume: ')}") from None
    flags = [arg for arg in args if arg not in parsed.overrides]
    return [*flags, *merged, *(o.input_line for o in overrides if o.is_hydra_override()), resume.input_line,
            f"hydra.run.dir={resume.get_value_element_as_str()}", "hydra.output_subdir=null"]


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


# ANSI escape sequences: CSI (colour, cursor: ESC [ ... final byte), OSC (hyperlinks, titles: ESC ] ... BEL
# or ESC backslash) and the short ones (ESC, intermediate bytes, final byte, e.g. ESC 7, ESC ( B)
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])")


class PlainFormatter(logging.Formatter):
    """The formatter of the run's ``train.log`` (``hydra.job_logging``): ANSI escape codes removed."""

    def format(self, record: logging.LogRecord) -> str:
        return ANSI_ESCAPE.sub("", super().format(record))


def _run_group() -> str | None:
    """The W&B group of this run: the sweep's (``sweep-<dir name>``), else the experiment's name."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"sweep-{Path(hydra_cfg.sweep.dir).name}"
    return None


def _search_stops_at_a_failed_job(hydra_cfg: Any) -> bool:
    """Whether the sweep is an Optuna search run in this process: hydra-optuna-sweeper gives up at the
    first trial without a value (with a traceback), so the job ends the process in one line instead."""
    sweeper, launcher = str(hydra_cfg.sweeper.get("_target_", "")), str(hydra_cfg.launcher.get("_target_", ""))
    return sweeper.endswith("OptunaSweeper") and launcher.endswith("BasicLauncher")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name=CONFIG_NAME)
def _app(cfg: DictConfig) -> float | list[float] | None:
    """One job: train, recording a failure in the run's ``results.json`` (and W&B) as one line."""
    from approxtrain.run.launch import follow, launched

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if (launch := launched()).follows:  # a SLURM task other than the first: rank 0 sends it the job
        if (code := follow(launch)) != 0:
            raise SystemExit(code)
        return None
    try:  # a single run's dir is held already (by main or unique_dir); a sweep's job holds its own
        taken = hold(run_dir)
    except ValueError as busy:  # held by another live run: nothing of it is touched
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s not run: %s", hydra_cfg.job.num, busy)
            return None
        print(f"approxtrain: error: {busy}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    try:
        return _train(cfg, run_dir)
    finally:
        if taken:
            release(run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> float | list[float] | None:
    """Train one run; returns its ``objective`` (:mod:`approxtrain.cli.objective`), None for a failed job of a sweep."""
    from rich.console import Console

    from approxtrain.cli.console import ConsoleCallback, print_config
    from approxtrain.cli.objective import objective_value
    from approxtrain.run.errors import RunInterrupted
    from approxtrain.run.launch import lead
    from approxtrain.run.trainer import Trainer

    hydra_cfg = HydraConfig.get()
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    console = Console()
    if hydra_cfg.mode == RunMode.MULTIRUN and not container["resume"]:
        try:
            requeued = requeued_run(run_dir, container)
        except ValueError as unreadable:  # its checkpoint is damaged or unsafe: the job cannot continue it
            log.error("job %s not run: %s", hydra_cfg.job.num, unreadable)
            return None
        if requeued:
            log.info("job %s was requeued: continuing its run from %s", hydra_cfg.job.num, checkpoint_path(run_dir))
            container["resume"] = str(run_dir)
        elif (found := recorded_run(run_dir)) is not None:  # e.g. a hydra.sweep.subdir that names another job's dir
            log.error("job %s not run: %s already holds a run (%s)", hydra_cfg.job.num, run_dir, found)
            return None
    callbacks: list[Any] = [ConsoleCallback(console)]
    trainer = None
    try:
        if container["resume"]:  # the run's record is rewritten once its checkpoint is restored
            callbacks.insert(0, RecordResume(cfg, hydra_cfg.overrides.task, lambda: print_config(console, container, run_dir)))
        else:
            print_config(console, container, run_dir)
        if container["logger"]["name"] == "wandb":
            from approxtrain.cli.wandb_logger import wandb_callback

            if (logger := wandb_callback(container, run_dir, _run_group() or container["experiment_name"])) is not None:
                callbacks.append(logger)
        with lead(container, run_dir) as distributed:  # one process, or rank 0 of several
            trainer = Trainer(container, run_dir, callbacks, dist=distributed)
            results = trainer.fit()
    except RunInterrupted as interrupt:  # checkpointed and recorded: say how to continue, exit as the signal asks
        print(f"approxtrain: {interrupt}", file=sys.stderr)
        raise SystemExit(128 + interrupt.signal_number) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, like a kill
        print(f"approxtrain: stopped at once by a second SIGINT; {run_dir} keeps its last completed epoch", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as error:  # recorded (fit records its own failures), then reported as one line
        if trainer is None:  # the ranks could not be started: the run is recorded as failed all the same
            trainer = Trainer(container, run_dir, callbacks)
        message = trainer.results.error if trainer.results.error is not None else trainer.record_failure(error)
        log.debug("run failed", exc_info=True)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            if not _search_stops_at_a_failed_job(hydra_cfg):
                return None
            message = f"job {hydra_cfg.job.num} failed, which ends the Optuna search: {message}"
        print(f"approxtrain: error: {message}", file=sys.stderr)
        raise SystemExit(RUN_FAILED) from None
    return objective_value(container, results)


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[str]:
    """One line per job of the sweep in ``sweep_dir`` that did not finish (its ``results.json``
    says so, or it has none), among the job dirs written since ``since`` (a time stamp)."""
    lines = []
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml"), key=lambda path: path.stat().st_mtime):
        job_dir = hydra_yaml.parent.parent
        if hydra_yaml.stat().st_mtime < since:
            continue  # a job of an earlier sweep into the same dir
        try:
            job = OmegaConf.load(hydra_yaml).hydra.job
            results = read_results(job_dir)
        except Exception as error:  # noqa: BLE001 - a damaged record: one line naming the file
            lines.append(f"job dir {job_dir}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}")
            continue
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
    parsed = parse_args(args)
    if parsed is not None and not parsed.cfg:  # a command that trains (--help, --cfg, completion only print)
        from approxtrain.run.launch import follow, launched

        if (launch := launched()).follows_from_the_start:  # rank 0 runs Hydra and sends the jobs
            raise SystemExit(follow(launch))
    error = check_group_overrides(args)
    if error is None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        error = composition_error(args)
    if error is None:
        try:
            sys.argv[1:] = settle_run_dir(args)
        except ValueError as refused:
            error = str(refused)
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
