"""The ``approxtrain`` command line as Hydra reads it, read before Hydra runs.

The flags are Hydra's (``approxtrain --hydra-help``;
https://hydra.cc/docs/advanced/hydra-command-line-flags/), parsed as Hydra parses them;
everything else is an override. The checks that run before Hydra (group options, the
composition, the run dir) need to know which arguments are overrides, whether the command
runs anything, and where the configs come from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _parser() -> argparse.ArgumentParser:
    """Hydra's flags (their names, short forms and arguments); help texts are Hydra's to print."""
    parser = argparse.ArgumentParser(prog="approxtrain", add_help=False, exit_on_error=False)
    parser.add_argument("overrides", nargs="*")
    for flags in (("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r"),
                  ("--multirun", "-m"), ("--shell-completion", "-sc")):
        parser.add_argument(*flags, action="store_true")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    for flags in (("--package", "-p"), ("--config-path", "-cp"), ("--config-name", "-cn"), ("--config-dir", "-cd"),
                  ("--experimental-rerun",)):
        parser.add_argument(*flags)
    parser.add_argument("--info", "-i", const="all", nargs="?", choices=INFO_CHOICES)
    return parser


@dataclass(frozen=True)
class CommandLine:
    """What the checks before Hydra need from a command line."""

    overrides: tuple[str, ...]
    multirun: bool = False
    cfg: str | None = None  # --cfg job|hydra|all: print the config, run nothing
    help: bool = False
    config_dir: str | None = None
    config_path: str | None = None
    config_name: str | None = None

    @property
    def trains(self) -> bool:
        """Whether the command runs the app (a run or a sweep), rather than printing its help or config."""
        return self.cfg is None and not self.help


def read_command_line(args: list[str]) -> CommandLine | None:
    """The command line ``args``, or None for one that composes nothing for the app to run or print:
    a usage error (Hydra reports it), ``--hydra-help``, ``--version``, ``--info``, shell completion,
    ``--experimental-rerun``."""
    try:
        parsed, unknown = _parser().parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        return None
    if unknown or parsed.hydra_help or parsed.version or parsed.info or parsed.shell_completion or parsed.experimental_rerun:
        return None
    return CommandLine(tuple(parsed.overrides), parsed.multirun, parsed.cfg, parsed.help, parsed.config_dir,
                       parsed.config_path, parsed.config_name)
