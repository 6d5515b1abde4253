"""Which config keys make two runs comparable: flattening, key classes and run identity.

A run's resolved ``.hydra/config.yaml`` is flattened to dotted keys and each key is an
*approximation* key, a *bookkeeping* key or a *setting* (:mod:`approxtrain.run.config_keys`,
which resuming a run reads too).

A run's *identity* (:func:`run_identity`) is its settings but the seed plus its
approximation keys; an exact run has no approximation keys but ``sampler.name`` (it
ignores ``ratio``, ``layers`` and ``schedule``), so exact runs of a sweep over ``ratio``
are one experiment. The exact baseline of a run is a ``sampler.name == "exact"`` run
whose settings are all equal to the run's, seed included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from approxtrain.run.config_keys import (  # noqa: F401  (flatten: re-exported for compare's modules)
    flatten,
    is_approximation_key,
    is_bookkeeping_key,
)

EXACT_SAMPLER = "exact"
SEED_KEY = "seed"

ConfigKey = tuple[tuple[str, Any], ...]


def setting_key(config: Mapping[str, Any]) -> ConfigKey:
    """The settings a run shares with its baseline: every key but approximation,
    bookkeeping and the seed, as a sorted hashable tuple."""
    return tuple(
        sorted(
            (key, value)
            for key, value in config.items()
            if key != SEED_KEY and not is_approximation_key(key) and not is_bookkeeping_key(key)
        )
    )


def approximation_key(config: Mapping[str, Any]) -> ConfigKey:
    """The approximation a run uses as a sorted hashable tuple; all exact runs share one."""
    if config.get("sampler.name") == EXACT_SAMPLER:
        return (("sampler.name", EXACT_SAMPLER),)
    return tuple(sorted((k, v) for k, v in config.items() if is_approximation_key(k)))


def run_identity(config: Mapping[str, Any]) -> tuple[ConfigKey, ConfigKey]:
    """What makes two runs the same experiment: every key of the config but the seed, the
    bookkeeping keys and (for exact runs) the approximation keys exact ignores. Runs with
    one identity differ only in their seed, so they are replicates of one experiment."""
    return setting_key(config), approximation_key(config)


def differing_keys(configs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Sorted keys (bookkeeping keys and the seed left out) whose values are not the same in every config."""
    configs = list(configs)
    keys = {key for config in configs for key in config if key != SEED_KEY and not is_bookkeeping_key(key)}
    return sorted(key for key in keys if len({_hashable(config.get(key)) for config in configs}) > 1)


def compact_key(key: str) -> str:
    """Hydra-override spelling of a dotted key: ``sampler.name`` -> ``sampler``."""
    return key[: -len(".name")] if key.endswith(".name") else key


def _visible(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys worth comparing for display; an exact run hides its unused approximation keys."""
    shown = {k: v for k, v in config.items() if not is_bookkeeping_key(k)}
    if config.get("sampler.name") == EXACT_SAMPLER:
        shown = {k: v for k, v in shown.items() if k == "sampler.name" or not is_approximation_key(k)}
    return shown


def _group_of(key: str) -> str | None:
    """The config group a key belongs to when that group has a ``name`` (``sampler.scale`` -> ``sampler``)."""
    head, _, tail = key.partition(".")
    return head if tail and tail != "name" else None


def varying_keys(configs: list[Mapping[str, Any]], ignore: Iterable[str] = (SEED_KEY,)) -> list[str]:
    """Dotted keys whose values differ across ``configs``, approximation keys first.

    Only configs that have a key take part (an exact run shows no ratio or layers);
    a key of a named group (``sampler.scale``) only counts when it varies among
    configs that chose the same option (same ``sampler.name``).
    """
    visible = [_visible(config) for config in configs]
    keys = sorted({key for config in visible for key in config} - set(ignore), key=_display_order)
    return [key for key in keys if _varies(key, visible)]


def _varies(key: str, configs: list[Mapping[str, Any]]) -> bool:
    """Whether ``key`` takes more than one value among the configs that have it, per group option."""
    group = _group_of(key)
    partitions: dict[str, set[str]] = {}
    for config in configs:
        if key not in config:
            continue
        option = config.get(f"{group}.name") if group is not None else None
        partitions.setdefault(_hashable(option), set()).add(_hashable(config[key]))
    return any(len(values) > 1 for values in partitions.values())


def _display_order(key: str) -> tuple[int, str]:
    leading = ("sampler.name", "ratio", "layers.name")
    if key in leading:
        return leading.index(key), key
    return (len(leading) if is_approximation_key(key) else len(leading) + 1), key


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def format_overrides(config: Mapping[str, Any], keys: Iterable[str]) -> str:
    """``sampler=nps ratio=0.3`` for the given keys that ``config`` shows."""
    visible = _visible(config)
    return " ".join(f"{compact_key(key)}={_format_value(visible[key])}" for key in keys if key in visible)


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
