"""A ``--config-dir`` ahead of the package's configs: a user's file wins over ours of the same name.

Hydra 1.3 puts a ``--config-dir`` behind the app's own config source, so a user's
``DIR/model/mlp.yaml`` (or ``DIR/train.yaml``) would lose, silently, to the package's file of
that name. :class:`ConfigDirFirst`, a search path plugin registered with Hydra's public
``Plugins.register``, puts the dir first instead -- for Hydra's app and for the command line's
own composition (:mod:`approxtrain.cli.compose`) alike; the package's configs stay behind it for
everything the dir does not hold. No torch here.
"""

from __future__ import annotations

import os

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

_FIRST: list[str] = []  # the absolute --config-dir of the command line being composed, if any


class ConfigDirFirst(SearchPathPlugin):
    """Puts the command line's ``--config-dir`` ahead of the app's own config source."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in _FIRST:
            search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="main"))


def put_config_dir_first(config_dir: str | None) -> None:
    """From now on in this process, compose with ``config_dir`` (None: none) ahead of the package's configs."""
    if ConfigDirFirst not in Plugins.instance().discover(SearchPathPlugin):
        Plugins.instance().register(ConfigDirFirst)
    _FIRST[:] = [os.path.abspath(config_dir)] if config_dir is not None else []
