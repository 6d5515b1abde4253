"""The dotted keys of a run's config: reading one (:func:`lookup`), flattening a config to them,
and what each is -- the one owner of the key classes that resuming a run and comparing runs both
read -- and the model's label they give (:func:`model_label`). No torch: the CLI reads it before a run.

A run's resolved config is flattened to dotted keys (``trainer.epochs``, ``sampler.name``;
:func:`flatten`). Every key falls in one of three classes:

* *approximation* keys define how a run approximates -- ``sampler.*``, ``ratio``,
  ``layers.*``, ``schedule.*`` (the ratio over time; and W&B's flat ``layer_rules``).
  They are what a comparison varies.
* *bookkeeping* keys cannot change what a run computes -- ``resume``,
  ``experiment_name``, ``objective``, ``logger.*``, ``hydra.*``, output paths,
  ``_``-prefixed keys (W&B's own), and leaf names that only steer I/O (``num_workers``, ``root``,
  ``download``, ``log_every_n_steps``, ``checkpoint``, ...). A resume may change them.
* every other key is a *setting* (``model.*``, ``dataset.*``, ``trainer.*`` --
  ``trainer.device`` included, since step times on different devices do not
  compare -- ``seed``, ...). A key nobody here has heard of is a setting, so a new
  config key keeps runs that differ in it apart, and a resume may not change it,
  without any change to this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

APPROXIMATION_PREFIXES = ("sampler", "ratio", "layers", "layer_rules", "schedule")
BOOKKEEPING_PREFIXES = (
    "resume",
    "experiment_name",
    "objective",  # what the app returns to a sweeper (Optuna); training does not read it
    "search",  # the sweeper preset's own keys (baseline, margin)
    "logger",
    "hydra",
    "wandb",
    "paths",
    "output_dir",
    "run_dir",
    "work_dir",
    "checkpoint_dir",
)
BOOKKEEPING_LEAVES = (
    "num_workers",
    "pin_memory",
    "root",
    "download",
    "log_every",
    "log_every_n_steps",
    "log_interval",
    "checkpoint",
    "checkpoint_every",
    "progress",
    "telemetry_every",
)


def lookup(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``cfg["a"]["b"]`` for ``"a.b"`` in a plain nested mapping; ``default`` where a key is missing."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def model_label(flat: Mapping[str, Any]) -> str | None:
    """What a run's model is, in one word for its name, tags, ``results.json`` and compare's tables,
    from its flattened config: ``model.name`` for the package's own models; for a model brought
    along, its ``arch`` (``torchvision.resnet18``) or its ``_target_`` (``byo_nets.SmallConvNet``;
    a factory's ``model_name`` after a colon: ``timm.create_model:resnet18``). None without ``model.name``.

    Examples::

        >>> model_label({"model.name": "mlp"}), model_label({"model.name": "torchvision", "model.arch": "vit_b_16"})
        ('mlp', 'torchvision.vit_b_16')
        >>> model_label({"model.name": "custom", "model._target_": "timm.create_model", "model.model_name": "resnet10t"})
        'timm.create_model:resnet10t'
    """
    name, arch, target = flat.get("model.name"), flat.get("model.arch"), flat.get("model._target_")
    if name is None:
        return None
    if arch is not None:
        return f"{name}.{arch}"
    if isinstance(target, str) and target not in ("", "???"):
        model_name = flat.get("model.model_name")
        return f"{target}:{model_name}" if isinstance(model_name, str) else target
    return str(name)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys; lists become canonical JSON strings.

    ``{"model": {"name": "mlp"}, "ratio": 0.3}`` -> ``{"model.name": "mlp", "ratio": 0.3}``.
    Keys that are already dotted (W&B's flat config) pass through unchanged.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{dotted}."))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(value, sort_keys=True, default=str)
        else:
            flat[dotted] = value
    return flat


def _has_prefix(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def is_approximation_key(key: str) -> bool:
    """True for the keys that define the approximation (``sampler.*``, ``ratio``, ``layers.*``)."""
    return _has_prefix(key, APPROXIMATION_PREFIXES)


def is_bookkeeping_key(key: str) -> bool:
    """True for keys that cannot change what a run computes (logging, paths, resume)."""
    if key.startswith("_") or _has_prefix(key, BOOKKEEPING_PREFIXES):
        return True
    return key.rsplit(".", 1)[-1] in BOOKKEEPING_LEAVES
