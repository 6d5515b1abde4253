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

from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.cli.command_line import CommandLine, read_command_line
from approxtrain.cli.compose import CONFIG_NAME, CONFIG_PACKAGE, check_group_overrides, checked_config, composition_error
from approxtrain.cli.config_dir import put_config_dir_first
from approxtrain.cli.help import help_text
from approxtrain.cli.resume import RecordResume, last_value, parse_overrides, requeued_run, resume_override, resume_overrides
from approxtrain.run.rundir import checkpoint_path, claim_new_dir, hold, holder, recorded_run, release
from approxtrain.run.schema import FINISHED, read_results

log = logging.getLogger("approxtrain")
# Exit codes: 0 finished; RUN_FAILED a run (or a sweep's job) failed, recorded in its results.json;
# USAGE_ERROR the command line cannot be composed (nothing ran); 128 + N stopped by signal N
# (130 SIGINT, 143 SIGTERM) at a step boundary, with a checkpoint to continue from.
RUN_FAILED = 1
USAGE_ERROR = 2

# hydra.run.dir / hydra.sweep.dir: a new dir, claimed (created and held) by this process. Cached,
# and the cache travels with the config to a sweep's jobs (Hydra's load_sweep_config, pickling).
if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", claim_new_dir, use_cache=True)


def settle_run_dir(args: list[str]) -> list[str]:
    """The command line to run, its run dir settled and held by this process: for ``resume=DIR`` the
    run's own command line (:func:`resumed_args`); an explicit ``hydra.run.dir`` (``hydra.sweep.dir``
    with ``-m``) as given. ``ValueError`` (one line) when the dir is held by a live run, holds a run
    (other than for ``resume=``) or cannot be resumed so; nothing is written then. The default dir
    is left to ``${unique_dir:...}``."""
    command_line = read_command_line(args)
    if command_line is None or not command_line.trains:  # --help and --cfg print and run nothing
        return args
    try:
        overrides = parse_overrides(command_line.overrides)
    except Exception:  # noqa: BLE001 - malformed (only reached with HYDRA_FULL_ERROR=1): Hydra reports it
        return args
    resume = resume_override(overrides)
    target = resume or last_value(overrides, "hydra.sweep.dir" if command_line.multirun else "hydra.run.dir")
    if target is None or "${" in str(target.value()):
        return args  # the default dir (claimed by unique_dir) or one Hydra has to resolve: its jobs hold it
    run_dir = Path(str(target.value()))
    pid = holder(run_dir)
    if pid is not None:
        raise ValueError(f"{target.input_line}: the dir is held by a live run (pid {pid}); allowed: a dir no live run holds")
    if resume is not None:
        args = resumed_args(args, command_line, overrides, resume)
    elif (found := recorded_run(run_dir)) is not None:
        raise ValueError(f"{target.input_line}: the dir already holds a run ({found}); allowed: a new or empty dir"
                         + ("" if command_line.multirun else f", or resume={target.get_value_element_as_str()} to continue it"))
    hold(run_dir)
    return args


def resumed_args(args: list[str], command_line: CommandLine, overrides: list[Override], resume: Override) -> list[str]:
    """The command line that continues the run ``resume`` names: its saved overrides with the command
    line's on top (:func:`~approxtrain.cli.resume.resume_overrides`), run in its dir without Hydra
    rewriting its ``.hydra`` files (:class:`~approxtrain.cli.resume.RecordResume` does, once the
    checkpoint is restored). ``ValueError`` (one line) when it cannot be continued so. The config the
    command line continues with is composed and checked here, once (:func:`checked_config`)."""
    if command_line.multirun:
        raise ValueError(f"{resume.input_line}: resume continues one run; it cannot be part of a sweep (-m)")
    if last_value(overrides, "hydra.run.dir") is not None:
        raise ValueError(f"{resume.input_line}: the run continues in its own dir; leave out hydra.run.dir")
    try:
        merged = resume_overrides(resume, [o for o in overrides if not o.is_hydra_override()],
                                  lambda overrides: checked_config(command_line, overrides, args))
    except ValueError as error:
        raise ValueError(f"{resume.input_line}: {str(error).removeprefix('resume: ')}") from None
    flags = [arg for arg in args if arg not in command_line.overrides]
    return [*flags, *merged, *(o.input_line for o in overrides if o.is_hydra_override()), resume.input_line,
            f"hydra.run.dir={resume.get_value_element_as_str()}", "hydra.output_subdir=null"]


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
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return _hold_and_train(cfg, run_dir)
    from approxtrain.cli.sweep_stop import stop_requested
    from approxtrain.run.signals import stop_signals

    with stop_signals():  # a stop sent to the job before it trains: the trainer stops at its first step
        return _hold_and_train(cfg, run_dir, lambda: stop_requested(hydra_cfg.sweep.dir))


def _hold_and_train(cfg: DictConfig, run_dir: Path, stopped: Any = lambda: False) -> float | list[float] | None:
    """Hold the run dir and train; a sweep's job that finds the sweep stopped does not start."""
    hydra_cfg = HydraConfig.get()
    try:  # a single run's dir is held already (by main or unique_dir); a sweep's job holds its own
        taken = hold(run_dir)
    except ValueError as busy:  # held by another live run: nothing of it is touched
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s not run: %s", hydra_cfg.job.num, busy)
            return None
        print(f"approxtrain: error: {busy}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    try:
        if stopped():  # (checked once the dir is held: the launching process signals the jobs that hold theirs)
            log.warning("job %s not started: the sweep was stopped", hydra_cfg.job.num)
            return None
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
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the job returns (a worker that exits reads as a crash); the sweep exits
            log.warning("job %s %s", hydra_cfg.job.num, interrupt)
            return None
        print(f"approxtrain: {interrupt}", file=sys.stderr)
        raise SystemExit(128 + interrupt.signal_number) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, like a kill
        message = f"stopped at once by a second SIGINT; {run_dir} keeps its last completed epoch"
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.warning("job %s %s", hydra_cfg.job.num, message)
            return None
        print(f"approxtrain: {message}", file=sys.stderr)
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


def job_statuses(sweep_dir: Path, since: float = 0.0) -> list[tuple[str, str]]:
    """``(status, line)`` for each job of the sweep in ``sweep_dir`` (its ``results.json`` status;
    ``not started`` without one), among the job dirs written since ``since`` (a time stamp)."""
    jobs = []
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml"), key=lambda path: path.stat().st_mtime):
        job_dir = hydra_yaml.parent.parent
        if hydra_yaml.stat().st_mtime < since:
            continue  # a job of an earlier sweep into the same dir
        try:
            job = OmegaConf.load(hydra_yaml).hydra.job
            results = read_results(job_dir)
        except Exception as error:  # noqa: BLE001 - a damaged record: one line naming the file
            jobs.append(("damaged", f"job dir {job_dir}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"))
            continue
        name = f"job {job.num} ({job.override_dirname})"
        if results is None:
            jobs.append(("not started", f"{name}: no results.json (died or stopped before it started training)"))
        else:
            status = str(results.get("status"))  # an interrupted run's error says so: "interrupted by SIGTERM at step 7"
            jobs.append((status, f"{name}: {results.get('error') or status}"))
    return jobs


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[str]:
    """One line per job of the sweep in ``sweep_dir`` that did not finish (its ``results.json``
    says so, or it has none), among the job dirs written since ``since`` (a time stamp)."""
    return [line for status, line in job_statuses(sweep_dir, since) if status != FINISHED]


class SweepEndCallback(HydraCallback):
    """For the life of a sweep (in the launching process): stops it on SIGTERM/SIGINT
    (:mod:`approxtrain.cli.sweep_stop`); when it ends prints the comparison table of its runs, then
    lists the jobs that did not finish (every job's status after a stop) and exits non-zero if any
    did not finish (``128 + N`` after signal N)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.stop: Any = None

    def __getstate__(self) -> dict[str, Any]:  # travels to joblib's workers with Hydra's context: not the handlers
        return {**self.__dict__, "stop": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from approxtrain.cli.sweep_stop import SweepStop

        self.started = time.time() - 1.0  # file time stamps may be coarser than the clock
        self.stop = SweepStop(Path(config.hydra.sweep.dir), lambda number: self._give_up(Path(config.hydra.sweep.dir), number))
        self.stop.install()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from approxtrain.cli.sweep_stop import shut_down_loky_workers

        stopped_by = self.stop.signal_number if self.stop is not None else None
        if self.stop is not None:
            self.stop.restore()
        shut_down_loky_workers()
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from approxtrain.compare import print_sweep_table
        except ImportError:  # the comparison package is optional for training
            pass
        else:
            print_sweep_table(sweep_dir)
        code = self._summarize(sweep_dir, stopped_by)
        if code:
            raise SystemExit(code)

    def _summarize(self, sweep_dir: Path, stopped_by: int | None) -> int:
        """Print the jobs that did not finish (every job after a stop); the exit code they call for."""
        jobs = job_statuses(sweep_dir, self.started)
        if stopped_by is not None:
            print(f"approxtrain: the sweep was stopped by {signal.Signals(stopped_by).name}; its jobs:", file=sys.stderr)
            for status, line in jobs:
                print(f"  {status}: {line}", file=sys.stderr)
            print("approxtrain: continue an interrupted job with resume=<its dir>", file=sys.stderr)
            return 128 + stopped_by
        failures = [line for status, line in jobs if status != FINISHED]
        if failures:
            print(f"approxtrain: {len(failures)} job(s) failed:", file=sys.stderr)
            for line in failures:
                print(f"  {line}", file=sys.stderr)
            return RUN_FAILED
        return 0

    def _give_up(self, sweep_dir: Path, signal_number: int) -> None:
        """The jobs outlasted the grace period (and were killed): summary, then exit at once."""
        from approxtrain.cli.sweep_stop import STOP_MARKER, shut_down_loky_workers

        print("approxtrain: the sweep's jobs did not stop in time; they were killed", file=sys.stderr)
        (sweep_dir / STOP_MARKER).unlink(missing_ok=True)
        shut_down_loky_workers()
        self._summarize(sweep_dir, signal_number)
        sys.stderr.flush()
        os._exit(128 + signal_number)


def _composes_before_running(command_line: CommandLine | None) -> bool:
    """Whether :func:`main` composes the command line's config to check it: for a run, a sweep and
    ``--cfg``; not for ``resume=`` (:func:`resumed_args` composes the config the run continues with),
    nor with ``HYDRA_FULL_ERROR=1`` (Hydra shows its full trace)."""
    if command_line is None or command_line.help or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    try:
        return resume_override(parse_overrides(command_line.overrides)) is None
    except Exception:  # noqa: BLE001 - malformed: the composition says why in one line
        return True


def _kernel_backend_error() -> str | None:
    """The one-line error of an invalid ``APPROXTRAIN_KERNELS``, which :mod:`approxtrain.kernels`
    reads when it is imported (as every training run imports it), or None."""
    try:
        import approxtrain.kernels  # noqa: F401 - only whether the environment lets it import
    except ValueError as invalid:
        return str(invalid)
    return None


def _usage_error(error: str) -> None:
    print(f"approxtrain: error: {error}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def main() -> None:
    """Console entry point: checks the command line (one-line errors, exit 2), then runs Hydra.

    ``HYDRA_FULL_ERROR=1`` skips the composition check, so Hydra shows its full trace.
    """
    args = sys.argv[1:]
    command_line = read_command_line(args)
    put_config_dir_first(command_line.config_dir if command_line is not None else None)  # for Hydra's app too
    if command_line is not None and command_line.trains:  # (--help, --cfg and shell completion only print)
        if (error := _kernel_backend_error()) is not None:
            _usage_error(error)
        from approxtrain.run.launch import follow, launched

        if (launch := launched()).follows_from_the_start:  # rank 0 runs Hydra and sends the jobs
            raise SystemExit(follow(launch))
    error = check_group_overrides(args)
    if error is None and command_line is not None and command_line.help and (text := help_text(command_line)) is not None:
        print(text)
        raise SystemExit(0)  # as Hydra's --help ends
    if error is None and _composes_before_running(command_line):
        error = composition_error(args)
    if error is None:
        try:
            sys.argv[1:] = settle_run_dir(args)
        except ValueError as refused:
            error = str(refused)
    if error:
        _usage_error(error)
    _app()


def entry() -> None:
    """The ``approxtrain`` console script: :func:`main` with the CPU allocator told to keep freed memory."""
    retain_freed_memory()
    main()


if __name__ == "__main__":
    entry()
