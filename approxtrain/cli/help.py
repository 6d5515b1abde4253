"""``approxtrain --help``: the app's help (``configs/hydra/help/approxtrain.yaml``) with its config
groups, printed without composing a config.

Hydra's own ``--help`` composes the whole config and lists the groups by composing their
search path once per group -- seconds on a small machine. The groups are the config folders
shipped in ``approxtrain.configs``, those of a ``--config-dir`` and the groups stored from code
(:mod:`approxtrain.cli.config_store`); each lists its options, as Hydra lists them. A command line
that changes how the help or the search path is made (``hydra.*`` overrides, ``--config-path``,
a ``--config-dir`` with ``hydra/`` configs, a template naming more than the groups) is left to
Hydra's ``--help``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from omegaconf import OmegaConf

from approxtrain.cli.command_line import CommandLine
from approxtrain.cli.compose import CONFIG_PACKAGE

HELP_CONFIG = "hydra/help/approxtrain.yaml"
HYDRA_GROUP = "hydra"
CONFIG_SUFFIX = ".yaml"


def _folder_groups(folder: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(group, option) for every config below ``folder`` (a Path or an importlib Traversable)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            yield from _folder_groups(entry, f"{prefix}{entry.name}/")
        elif prefix and entry.name.endswith(CONFIG_SUFFIX):
            yield prefix.rstrip("/"), entry.name[: -len(CONFIG_SUFFIX)]


def _stored_groups(path: str = "") -> Iterator[tuple[str, str]]:
    """(group, option) for every config stored from code in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    for name in store.list(path):
        child = f"{path}/{name}" if path else name
        if store.get_type(child) == ObjectType.GROUP:
            yield from _stored_groups(child)
        elif path and name.endswith(CONFIG_SUFFIX):
            yield path, name[: -len(CONFIG_SUFFIX)]


def config_groups(config_dirs: Iterable[str] = ()) -> dict[str, list[str]]:
    """The app's config groups (Hydra's own ``hydra/...`` left out) and their options, sorted."""
    found = [*_folder_groups(files(CONFIG_PACKAGE)), *_stored_groups(),
             *(pair for folder in config_dirs for pair in _folder_groups(Path(folder)))]
    groups: dict[str, set[str]] = {}
    for group, option in found:
        if group != HYDRA_GROUP and not group.startswith(f"{HYDRA_GROUP}/"):
            groups.setdefault(group, set()).add(option)
    return {group: sorted(groups[group]) for group in sorted(groups)}


def _template() -> str:
    """The help template (``hydra.help.template``) with its header and footer filled in."""
    text = files(CONFIG_PACKAGE).joinpath(HELP_CONFIG).read_text()
    return str(OmegaConf.create({HYDRA_GROUP: {"help": OmegaConf.create(text)}}).hydra.help.template)


def help_text(command_line: CommandLine) -> str | None:
    """The text ``approxtrain --help`` prints for ``command_line``; None when Hydra's ``--help`` must
    make it (see the module's docstring)."""
    config_dirs = [command_line.config_dir] if command_line.config_dir else []
    if (command_line.config_path is not None or any(arg.lstrip("+~").startswith(HYDRA_GROUP) for arg in command_line.overrides)
            or any((Path(folder) / HYDRA_GROUP).is_dir() for folder in config_dirs)):
        return None
    template = _template()
    if set(re.findall(r"\$\{?(\w+)", template)) - {"APP_CONFIG_GROUPS"}:
        return None
    groups = "".join(f"{group}: {', '.join(options)}\n" for group, options in config_groups(config_dirs).items())
    return string.Template(template).substitute(APP_CONFIG_GROUPS=groups)
