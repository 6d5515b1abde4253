"""The optional extras: each is declared once (``pyproject.toml``'s optional dependencies, and
:data:`approxtrain.extras.EXTRAS` says what it brings), and without it a feature that needs it
stops with one line that says what to install (the plain install runs everything else)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

from approxtrain.cli.train import composition_error
from approxtrain.extras import EXTRAS, MissingExtra, installed, missing_option_line, require

ROOT = Path(__file__).resolve().parents[1]
HYDRA_ERROR = ("In 'hydra/config': Could not find 'hydra/launcher/joblib'\n\nAvailable options in 'hydra/launcher':\n"
               "\tbasic\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf")
# one override per extra that brings a Hydra option, as a user types it (the models extra brings none)
USES = {"joblib": "hydra/launcher=joblib", "slurm": "hydra/launcher=submitit_slurm", "optuna": "search=pareto"}


def test_the_extras_are_the_packages_optional_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(declared) - {"dev"} == set(EXTRAS)
    assert set(USES) == {name for name, extra in EXTRAS.items() if extra.options}


def test_a_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher", None)  # not installed
    assert not installed("joblib")
    assert missing_option_line(HYDRA_ERROR) == 'hydra/launcher=joblib needs the joblib extra: pip install "approxtrain[joblib]"'
    with pytest.raises(MissingExtra, match=r'^joblib sweeps needs the joblib extra: pip install "approxtrain\[joblib\]"$'):
        require("joblib", "joblib sweeps")


def test_an_installed_extra_or_an_unknown_option_is_left_to_hydra(monkeypatch):
    monkeypatch.setattr("approxtrain.extras.installed", lambda extra: True)
    assert missing_option_line(HYDRA_ERROR) is None
    assert missing_option_line("Could not find 'hydra/launcher/mylauncher'") is None
    assert missing_option_line("Could not override 'trainer.epoch'") is None


@pytest.mark.parametrize("extra", list(USES))
def test_a_plain_install_names_the_extra_an_option_needs(extra):
    """On the plain install (CI's first stage), the override that needs the extra is one line."""
    if installed(extra):
        pytest.skip(f"the {extra} extra is installed (this checks the plain install)")
    option = USES[extra].replace("search=pareto", "hydra/sweeper=optuna")
    error = composition_error(["-m", USES[extra], "model=mlp", "dataset=digits", "logger=none"])
    assert error == f'{option} needs the {extra} extra: pip install "approxtrain[{extra}]"'


@pytest.mark.extra("slurm")
def test_the_slurm_launcher_off_a_cluster_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    error = composition_error(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "model=mlp", "dataset=digits"])
    assert error == ("hydra/launcher=submitit_slurm needs a SLURM cluster (srun is not on PATH); "
                     "on one machine: hydra/launcher=submitit_local")
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    assert composition_error(["-m", "hydra/launcher=submitit_slurm", "model=mlp", "dataset=digits"]) is None
