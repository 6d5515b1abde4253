"""Validation of a composed run config: every bad value becomes one clear line.

Values are checked where they enter (before any data or model is built), so a
bad ``ratio=1.5`` never reaches a kernel. Works on plain mappings (the CLI passes
the resolved Hydra config as a dict).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from approxtrain.models import model_options, model_spec
from approxtrain.sampling import POLICIES, SamplingConfig
from approxtrain.surgery import LayerRule, rules_from_dicts


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming it and what is allowed."""


_CHOICES = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.amp": ("auto", "bf16", "off"),
    "trainer.optimizer.name": ("adam", "sgd"),
    "trainer.scheduler.name": ("none", "multistep", "exponential"),
    "trainer.scheduler.interval": ("epoch", "step"),
    "logger.name": ("wandb", "none"),
}
_LOGGER_MODES = ("auto", "online", "offline", "disabled")


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def sampler_defaults() -> dict[str, Any]:
    """The sampler group's fields and their defaults: :class:`SamplingConfig`'s, less
    ``policy`` (the sampler's ``name``) and ``ratio`` (the top-level ``ratio``)."""
    return {field.name: field.default for field in fields(SamplingConfig) if field.name not in ("policy", "ratio")}


def default_sampling(cfg: Mapping[str, Any]) -> SamplingConfig:
    """The sampling the layer rules start from: the sampler group plus the top-level ratio."""
    sampler = dict(cfg.get("sampler") or {})
    name = sampler.pop("name", None)
    if name not in POLICIES:
        raise ConfigError(f"sampler={name!r} is unknown; allowed: {', '.join(POLICIES)}")
    allowed = sampler_defaults()
    unknown = sorted(set(sampler) - set(allowed))
    if unknown:
        raise ConfigError(f"sampler.{unknown[0]} is not a sampler field; allowed: name, {', '.join(allowed)}")
    try:
        return SamplingConfig(policy=name, ratio=cfg.get("ratio"), **sampler)
    except ValueError as error:  # the top-level ratio, or a sampler field
        raise ConfigError(str(error) if str(error).startswith("ratio=") else f"sampler.{error}") from None


def layer_rules(cfg: Mapping[str, Any]) -> list[LayerRule]:
    """The ``layers`` group's rules, each completed from :func:`default_sampling`."""
    default = default_sampling(cfg)
    rules = _get(cfg, "layers.rules")
    if rules is None or not isinstance(rules, (list, tuple)):
        raise ConfigError(f"layers.rules={rules!r} is invalid; allowed: a list of rules like [{{match: 'fc*', type: Linear}}]")
    try:
        return rules_from_dicts(rules, default)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_logger(cfg: Mapping[str, Any]) -> None:
    """The W&B logger's keys; :func:`validate` checks them, and so does the logger, which starts before the run's setup."""
    if _get(cfg, "logger.name") != "wandb":
        return
    mode = _get(cfg, "logger.mode")
    if mode not in _LOGGER_MODES:
        raise ConfigError(f"logger.mode={mode!r} is invalid; allowed: {', '.join(_LOGGER_MODES)}")
    timeout = _get(cfg, "logger.init_timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigError(f"logger.init_timeout_s={timeout!r} is invalid; allowed: a number of seconds > 0, e.g. 15")


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every value the run depends on; raise :class:`ConfigError` on the first bad one."""
    layer_rules(cfg)
    model = cfg.get("model") or {}
    try:
        model_spec(model).check_options(model_options(model))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    for dotted, allowed in _CHOICES.items():
        value = _get(cfg, dotted)
        if value is not None and value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is invalid; allowed: {', '.join(allowed)}")
    check_logger(cfg)
    for dotted in ("trainer.epochs", "dataset.batch_size"):
        value = _get(cfg, dotted)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{dotted}={value!r} is invalid; allowed: an integer >= 1")
    max_steps = _get(cfg, "trainer.max_steps")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"trainer.max_steps={max_steps!r} is invalid; allowed: null or an integer >= 1")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is invalid; allowed: an integer")
    lr = _get(cfg, "trainer.optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"trainer.optimizer.lr={lr!r} is invalid; allowed: a number > 0")
    for dotted in ("trainer.compile", "trainer.deterministic", "trainer.checkpoint"):
        value = _get(cfg, dotted)
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}={value!r} is invalid; allowed: true, false")
    channels_last = _get(cfg, "trainer.channels_last")
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"trainer.channels_last={channels_last!r} is invalid; allowed: auto, true, false")
