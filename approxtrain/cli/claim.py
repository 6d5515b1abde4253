"""The run dir (or sweep dir) a command line resolves to, claimed before Hydra writes into it.

Hydra resolves ``hydra.run.dir`` / ``hydra.sweep.dir`` -- ``${now:...}``, ``${oc.env:...}``,
``${hydra:runtime.cwd}`` and the like -- only when it runs, and writes ``.hydra/`` and
``train.log`` there before the task starts. :class:`ClaimRunDir` is the Hydra callback that
every launcher passes through first (``on_run_start`` / ``on_multirun_start``, in the process
that launches): it resolves the dir as Hydra will and claims it
(:func:`approxtrain.run.rundir.claim`), so a dir that holds a run or that a live run holds is
refused in one line (exit 2) with nothing written, whatever its value looked like on the
command line. A sweep's jobs claim their own dirs again in the job (:func:`claim_job_dir`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from approxtrain.run.rundir import claim

OURS = "ValueError raised while resolving interpolation: "  # how OmegaConf words a resolver's ValueError


def refuse(line: str) -> None:
    from approxtrain.cli.train import USAGE_ERROR

    print(f"approxtrain: error: {line}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def resolved_dir(config: DictConfig, key: str) -> Path:
    """The dir ``key`` names, resolved as Hydra will resolve it (an interpolation is resolved once:
    ``unique_dir`` caches its claim in ``config``); ``ValueError`` (one line) when it cannot be."""
    HydraConfig.instance().set_config(config)  # for ${hydra:...}
    try:
        value = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception as error:  # noqa: BLE001 - a bad interpolation: one line naming the key
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if reason.startswith(OURS):  # unique_dir's own line (a dir that cannot be created) says it all
            raise ValueError(f"{key}: {reason.removeprefix(OURS)}") from None
        raise ValueError(f"{key} cannot be resolved ({reason}); allowed: a path, or interpolations Hydra resolves "
                         "before the run (${now:...}, ${oc.env:...}, ${hydra:runtime.cwd})") from None
    if value in (None, ""):
        raise ValueError(f"{key} is empty; allowed: a path")
    return Path(str(value)).absolute()


def _resume_dir(config: DictConfig) -> Path | None:
    value = OmegaConf.select(config, "resume", default=None)
    return Path(str(value)).resolve() if value not in (None, "") else None


class ClaimRunDir(HydraCallback):
    """Claims the resolved run dir (one run) or sweep dir (``-m``) before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = resolved_dir(config, "hydra.run.dir")
            claim(run_dir, "hydra.run.dir", continues=_resume_dir(config) == run_dir.resolve())
        except ValueError as refused:
            refuse(str(refused))
        say_if_outside(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = resolved_dir(config, "hydra.sweep.dir")
            claim(sweep_dir, "hydra.sweep.dir")
        except ValueError as refused:
            refuse(str(refused))
        say_if_outside(sweep_dir, "hydra.sweep.dir")


def say_if_outside(run_dir: Path, key: str) -> None:
    """One line on stderr when the run goes outside the working dir (``../..``, ``/elsewhere``): where it goes."""
    cwd = Path.cwd().resolve()
    if not run_dir.resolve().is_relative_to(cwd):
        print(f"approxtrain: {key} is outside the working dir {cwd}: the run is written to {run_dir.resolve()}", file=sys.stderr)
