"""Validation of a composed run config: every bad value becomes one clear line.

Values are checked where they enter (before any data or model is built), so a
bad ``ratio=1.5`` never reaches a kernel. Works on plain mappings (the CLI passes
the resolved Hydra config as a dict).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from approxtrain.checks import ConfigError, integer
from approxtrain.models import model_options, model_spec
from approxtrain.policies import import_policy_module, policy_names
from approxtrain.run.config_keys import lookup
from approxtrain.run.optim import check_targets
from approxtrain.sampling import SamplingConfig, num_kept
from approxtrain.sampling_fields import sampler_defaults
from approxtrain.schedule import schedule_fields
from approxtrain.spec import RunSpec, dataset_spec, logger_spec, trainer_spec
from approxtrain.surgery import LayerRule, Plan, rules_from_dicts

SEED = integer(0, 2**63 - 1, "an integer in [0, 2**63 - 1]")
_K_LIMITS = ("min_k", "bwd_min_k", "wu_min_k", "align_k")  # the sampling fields that can raise k to n


def default_sampling(cfg: Mapping[str, Any]) -> SamplingConfig:
    """The sampling the layer rules start from: the sampler group plus the top-level ratio. A
    ``sampler.module`` is imported first (it registers the policies it defines)."""
    sampler = dict(cfg.get("sampler") or {})
    name = sampler.pop("name", None)
    try:
        import_policy_module(sampler.pop("module", None))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if name not in policy_names():
        raise ConfigError(f"sampler={name!r} is unknown; allowed: {', '.join(policy_names())}")
    allowed = sampler_defaults()
    unknown = sorted(set(sampler) - set(allowed))
    if unknown:
        raise ConfigError(f"sampler.{unknown[0]} is not a sampler field; allowed: name, module, {', '.join(allowed)}")
    try:
        return SamplingConfig(policy=name, ratio=cfg.get("ratio"), **sampler)
    except ValueError as error:  # the top-level ratio, or a sampler field
        raise ConfigError(str(error) if str(error).startswith("ratio=") else f"sampler.{error}") from None


def layer_rules(cfg: Mapping[str, Any]) -> list[LayerRule]:
    """The ``layers`` group's rules, each completed from :func:`default_sampling`."""
    default = default_sampling(cfg)
    rules = lookup(cfg, "layers.rules")
    if rules is None or not isinstance(rules, (list, tuple)):
        raise ConfigError(f"layers.rules={rules!r} is invalid; allowed: a list of rules like [{{match: 'fc*', type: Linear}}]")
    try:
        return rules_from_dicts(rules, default)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate(cfg: Mapping[str, Any]) -> RunSpec:
    """Check every value the run depends on and return the run's :class:`~approxtrain.spec.RunSpec`;
    raise :class:`ConfigError` on the first bad value."""
    rules = layer_rules(cfg)
    model = cfg.get("model") or {}
    try:
        model_spec(model).check_options(model_options(model))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    seed = SEED("seed", cfg.get("seed"))
    trainer = trainer_spec(cfg.get("trainer"))
    check_targets(trainer)
    return RunSpec(trainer=trainer, dataset=dataset_spec(cfg.get("dataset")), logger=logger_spec(cfg.get("logger")),
                   schedule=schedule_fields(cfg.get("schedule")), model=model, rules=rules, ratio=cfg["ratio"], seed=seed,
                   resume=cfg.get("resume"), config=cfg)


def all_exact_warning(cfg: Mapping[str, Any], plan: Plan, rules: list[LayerRule] | None = None) -> str | None:
    """One line when the rules ask for sampling but the floors on ``k`` (``min_k``, ``bwd_min_k``,
    ``wu_min_k``) or ``align_k`` make every sampled layer keep all its pairs (k = n, no MACs saved),
    naming the keys that do it; None otherwise. ``rules``: the config's :func:`layer_rules`, when built already."""
    rules = rules if rules is not None else layer_rules(cfg)
    sampled = [row for row in plan.rows if row.policy != "exact" and row.rule is not None]
    if not sampled or any(row.k < row.n or row.approx_macs.total < row.exact_macs.total for row in sampled):
        return None
    limits: dict[str, int] = {}  # key -> value
    for row in sampled:
        sampling, rule = rules[row.rule].sampling, cfg["layers"]["rules"][row.rule]
        if num_kept(row.n, sampling.ratio, rounding=sampling.k_rounding) == row.n and not sampling.samples_backward:
            continue  # its ratios keep every pair by themselves
        for name in _K_LIMITS:
            if getattr(sampling, name) > 1:
                limits.setdefault(f"layers.rules[{row.rule}].{name}" if name in rule else f"sampler.{name}", getattr(sampling, name))
    if not limits:
        return None
    settings = ", ".join(f"{key}={value}" for key, value in limits.items())
    return (f"{settings} {'keeps' if len(limits) == 1 else 'keep'} every pair of every sampled layer (k = n): "
            f"this run is exact training; lower {' / '.join(limits)}")
