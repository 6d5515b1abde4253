"""The config a command line composes, composed before Hydra runs so a mistake is one line.

Composition goes through Hydra's public compose API (``initialize_config_module`` and
``compose``) with the search path Hydra's app uses: the package's configs
(``approxtrain.configs``), a ``--config-dir``'s ahead of them (:mod:`approxtrain.cli.config_dir`).
A command line that cannot be composed -- an unknown group option, a key that does not exist, a bad
interpolation, an objective that cannot be computed -- is one line naming the key, the
value and what is allowed (:func:`composition_error`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig, OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (stores the config nodes made from code before anything is composed)
from approxtrain.cli.command_line import CommandLine, read_command_line
from approxtrain.cli.config_dir import put_config_dir_first

CONFIG_PACKAGE = "approxtrain.configs"
CONFIG_NAME = "train"
GROUPS = ("model", "dataset", "sampler", "layers", "logger", "experiment", "trainer", "search", "callbacks")
SEARCH_PATH_KEY = "hydra.searchpath"


def group_options(group: str, config_dirs: Sequence[str] = ()) -> list[str]:
    """The options of a config group: shipped with the package or in the user's ``--config-dir``s."""
    folders = [files(CONFIG_PACKAGE).joinpath(group), *(Path(folder) / group for folder in config_dirs)]
    return sorted({entry.name[:-5] for folder in folders if folder.is_dir() for entry in folder.iterdir()
                   if entry.name.endswith(".yaml")})


def check_group_overrides(args: list[str]) -> str | None:
    """A one-line error for ``group=option`` overrides naming an option that does not exist, else None.

    Sweep values (``sampler=topk,nps``) are checked one by one; options in ``--config-dir``
    count; with a ``hydra.searchpath`` override, and for sweep functions, Hydra decides.
    """
    command_line = read_command_line(args)
    if command_line is None or any(arg.startswith(SEARCH_PATH_KEY) for arg in command_line.overrides):
        return None
    config_dirs = [command_line.config_dir] if command_line.config_dir else []
    for arg in command_line.overrides:
        if arg.startswith(("+", "~", "hydra")) or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.removeprefix("override ").strip()
        if key not in GROUPS or "(" in value or value in ("", "null"):
            continue
        options = group_options(key, config_dirs)
        for choice in value.split(","):
            if options and choice not in options and "/" not in choice:
                return f"{key}={choice} is unknown; allowed: {', '.join(options)}"
    return None


def first_of_each_sweep(overrides: Sequence[str]) -> list[str]:
    """The overrides of one job of the sweep they describe (``ratio=0.3,0.5`` -> ``ratio=0.3``); sweeps
    without a list of values (``interval(...)``, for the Optuna sweeper) are left out."""
    single = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_sweep_override():
            single.append(override.input_line)
            continue
        try:
            value = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - not a list-like sweep: nothing to pick
            continue
        single.append(f"{override.get_key_element()}={value}")
    return single


def compose(command_line: CommandLine, overrides: Sequence[str]) -> DictConfig:
    """The config (with its ``hydra`` node) that ``overrides`` compose for ``command_line``, as Hydra's
    app composes it: the package's configs, a ``--config-dir``'s ahead of them (:mod:`~approxtrain.cli.config_dir`)."""
    put_config_dir_first(command_line.config_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
            return hydra_compose(command_line.config_name or CONFIG_NAME, list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def checked_config(command_line: CommandLine, overrides: Sequence[str], args: Sequence[str]) -> DictConfig:
    """:func:`compose`, then the checks that need the composed config: a model argument's ``${...}``
    resolves (``model=custom``), the ``objective`` can be computed and, for a command line that trains,
    every value the run depends on is valid (:func:`run_spec_error`). ``ValueError`` (one line; ``args``,
    the command line, names the values) when the config cannot be composed or fails a check."""
    from approxtrain.extras import missing_cluster_line, missing_option_line

    try:
        cfg = compose(command_line, overrides)
        OmegaConf.to_container(cfg.model, resolve=True)  # a model argument's ${...} (model=custom) fails here, not in the job
    except Exception as error:  # noqa: BLE001 - every composition error becomes one line
        from approxtrain.models.custom import dataset_fact_hint

        text = str(error)
        raise ValueError(missing_option_line(text) or composition_error_line(text, command_line, args)
                         + dataset_fact_hint(text)) from None
    error_line = missing_cluster_line(str(cfg.hydra.launcher.get("_target_", ""))) or objective_error(cfg)
    if error_line is None and command_line.trains:
        error_line = run_spec_error(cfg)
    if error_line is not None:
        raise ValueError(error_line)
    return cfg


def job_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The config a job of ``cfg`` trains with: the composed config without its ``hydra`` node, resolved
    to plain values; None when it resolves only in the job (``${hydra:...}`` and the like)."""
    try:
        return {str(key): OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
                for key in cfg if key != "hydra"}
    except Exception:  # noqa: BLE001 - resolvable in the job only: the trainer checks it there
        return None


def run_spec_error(cfg: DictConfig) -> str | None:
    """Why the composed config is no valid run (:func:`approxtrain.config.validate`: the key, the bad
    value, what is allowed), in one line; None when it is one. Imports the run's code (torch)."""
    from approxtrain.checks import ConfigError
    from approxtrain.config import validate

    config = job_config(cfg)
    if config is None:
        return None
    try:
        validate(config)
    except ConfigError as error:
        return str(error)
    return None


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]] | None:
    """Each job's overrides in a sweep of the basic sweeper (the product of the sweeps' values, as it
    makes them); None when a sweep has no list of values (``interval(...)``)."""
    choices = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        try:
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        except Exception:  # noqa: BLE001 - not a list-like sweep
            return None
    return [list(job) for job in itertools.product(*choices)]


def uses_basic_sweeper(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s sweep runs under Hydra's basic sweeper, whose jobs are known before it starts."""
    return str(cfg.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")


def sweep_line(command_line: CommandLine) -> str | None:
    """For a sweep's values without ``-m`` (``ratio=0.3,0.5``), the ways to say what was meant; else None."""
    if command_line.multirun:
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(list(command_line.overrides))
    except Exception:  # noqa: BLE001 - malformed: the composition's own line says where
        return None
    for override in overrides:
        if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            key, value = override.get_key_element(), override.input_line.partition("=")[2]
            other_ways = (", or one of them" if key.removeprefix("override ") in GROUPS
                          else f", {key}=[{value}] for a list, or {key}=\\'{value}\\' for a string")
            return f"{override.input_line} is a sweep; allowed: -m to run one job per value{other_ways}"
    return None


def composition_error(args: list[str]) -> str | None:
    """Compose the config the command line asks for, as Hydra will, and return the reason it cannot be
    composed, or is no valid run, in one line (None when it can). A sweep is checked through its first
    job; under the basic sweeper through every job (their overrides are known before it starts)."""
    command_line = read_command_line(args)
    if command_line is None:
        return None
    try:
        overrides = first_of_each_sweep(command_line.overrides) if command_line.multirun else command_line.overrides
    except Exception as error:  # noqa: BLE001 - a malformed override: Hydra's reason in one line
        return composition_error_line(str(error), command_line, args)
    try:
        cfg = checked_config(command_line, overrides, args)
        if command_line.multirun and command_line.trains and uses_basic_sweeper(cfg):
            for job in (sweep_jobs(command_line.overrides) or [])[1:]:
                checked_config(command_line, job, args)
    except ValueError as error:
        return sweep_line(command_line) or str(error)
    return None


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


def config_keys(path: str, command_line: CommandLine) -> list[str] | None:
    """The keys under ``path`` (top level for ``""``) of the config the command line's group choices
    compose, or None when they do not compose."""
    choices = [arg for arg in command_line.overrides
               if "=" in arg and arg.partition("=")[0].lstrip("+") in GROUPS and "," not in arg]
    try:
        cfg = compose(command_line, choices)
        node = OmegaConf.select(cfg, path) if path else cfg
    except Exception:  # noqa: BLE001 - no list rather than a wrong one
        return None
    if not isinstance(node, DictConfig):
        return None
    return sorted(str(key) for key in node.keys() if path or key != "hydra")


def composition_error_line(text: str, command_line: CommandLine, args: Sequence[str]) -> str:
    """One line for Hydra's reason not to compose the config.

    An override of a key that does not exist names the key, its value and the keys
    allowed there; any other message is folded into one line.
    """
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    match = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if match:
        key = match.group(1)
        value = next((arg.partition("=")[2] for arg in args
                      if arg.partition("=")[0].removeprefix("override ").strip() == key), "...")
        parent = key.rpartition(".")[0]
        keys = config_keys(parent, command_line)
        where = f"allowed under {parent}: " if parent else "allowed: "
        allowed = f"; {where}{', '.join(keys)}" if keys else ""
        return f"{key}={value} is not a config key{allowed} (to add a new key: +{key}={value})"
    return "; ".join(lines) if lines else "Hydra could not compose the config"
