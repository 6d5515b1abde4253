"""The optional extras (``pip install "approxtrain[NAME]"``): what each provides, whether it is
installed, and the one line a feature that needs a missing one stops with.

The plain install runs everything else; code that needs an extra imports it only on the path
that needs it, after :func:`require`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Extra:
    """An extra of ``pyproject.toml``: the modules it installs and the Hydra options it brings."""

    modules: tuple[str, ...]
    options: tuple[str, ...]  # group/option, e.g. hydra/launcher/joblib; a trailing * matches any suffix


EXTRAS = {
    "joblib": Extra(("hydra_plugins.hydra_joblib_launcher",), ("hydra/launcher/joblib",)),
    "slurm": Extra(("hydra_plugins.hydra_submitit_launcher", "submitit"), ("hydra/launcher/submitit_*",)),
    "optuna": Extra(("hydra_plugins.hydra_optuna_sweeper", "optuna"), ("hydra/sweeper/optuna", "hydra/sweeper/sampler/*")),
    # third-party model libraries: models built by _target_ (timm.create_model, transformers' classes)
    "models": Extra(("timm", "transformers"), ()),
}


# Launchers that submit to a cluster, and the command that must be on PATH there (submitit's own check).
CLUSTER_LAUNCHERS = {"hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": ("submitit_slurm", "srun")}


class MissingExtra(ImportError):
    """A feature needs an extra that is not installed (its message is one line: what to install)."""


def installed(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported (looked up, not imported)."""
    return all(_findable(module) for module in EXTRAS[extra].modules)


def hint(extra: str) -> str:
    """``needs the NAME extra: pip install "approxtrain[NAME]"``."""
    return f'needs the {extra} extra: pip install "approxtrain[{extra}]"'


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` ("``feature`` needs the ... extra: pip install ...") unless ``extra`` is installed."""
    if not installed(extra):
        raise MissingExtra(f"{feature} {hint(extra)}")


def missing_option_line(hydra_error: str) -> str | None:
    """The one line for Hydra's "Could not find 'hydra/launcher/joblib'" when an extra that is not
    installed brings that option (``hydra/launcher=joblib needs the joblib extra: ...``), else None."""
    found = re.search(r"Could not (?:find|load) '([\w/.-]+)'", hydra_error)
    if found is None:
        return None
    group, _, option = found.group(1).rpartition("/")
    for name, extra in EXTRAS.items():
        if not installed(name) and any(_matches(pattern, found.group(1)) for pattern in extra.options):
            return f"{group}={option} {hint(name)}"
    return None


def missing_cluster_line(launcher_target: str) -> str | None:
    """The one line for a cluster launcher chosen where its cluster is not (``srun`` not on PATH), else None."""
    if launcher_target not in CLUSTER_LAUNCHERS:
        return None
    option, command = CLUSTER_LAUNCHERS[launcher_target]
    if shutil.which(command) is not None:
        return None
    return (f"hydra/launcher={option} needs a SLURM cluster ({command} is not on PATH); "
            "on one machine: hydra/launcher=submitit_local")


def _matches(pattern: str, option: str) -> bool:
    return option.startswith(pattern[:-1]) if pattern.endswith("*") else option == pattern


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package (hydra_plugins itself)
        return False
