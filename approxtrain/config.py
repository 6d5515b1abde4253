"""Validation of a composed run config: every bad value becomes one clear line.

Values are checked where they enter (before any data or model is built), so a
bad ``ratio=1.5`` never reaches a kernel. Works on plain mappings (the CLI passes
the resolved Hydra config as a dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from approxtrain.models import model_options, model_spec
from approxtrain.policies import import_policy_module, policy_names
from approxtrain.run.config_keys import lookup
from approxtrain.run.selection_modes import get_selection_mode, selection_mode_names
from approxtrain.sampling import SamplingConfig, num_kept
from approxtrain.sampling_fields import sampler_defaults
from approxtrain.schedule import INTERVALS, SCHEDULES, schedule_fields
from approxtrain.surgery import LayerRule, Plan, rules_from_dicts


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming it and what is allowed."""


_LOGGER_MODES = ("auto", "online", "offline", "disabled")
_MISSING = object()


@dataclass(frozen=True)
class Check:
    """What a config value may be: ``accepts(value)``, and ``allowed``, the words that say it."""

    accepts: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None, allowed: str | None = None) -> Check:
    words = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    return Check(lambda value: _is_int(value) and low <= value and (high is None or value <= high), words)


def number(low: float, *, inclusive: bool = False) -> Check:
    return Check(lambda value: _is_number(value) and (value >= low if inclusive else value > low),
                 f"a number {'>=' if inclusive else '>'} {low:g}")


def _same(value: Any, option: Any) -> bool:
    """``value == option``, except that a boolean matches only itself (``1 == True``, yet 1 is no switch)."""
    return value is option if isinstance(value, bool) or isinstance(option, bool) else value == option


def choice(*options: Any) -> Check:
    return Check(lambda value: any(_same(value, option) for option in options),
                 ", ".join(str(option).lower() if isinstance(option, bool) else str(option) for option in options))


def or_null(check: Check) -> Check:
    return Check(lambda value: value is None or check.accepts(value), f"{check.allowed}, or null")


def _is_milestones(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and all(_is_int(step) and step >= 1 for step in value)
            and all(a < b for a, b in zip(value, value[1:])))


def _is_betas(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(beta) and 0 <= beta < 1 for beta in value)


SWITCH = choice(True, False)
# Every key of configs/trainer/default.yaml, the seed and the dataset's common keys (a dataset's
# own fields are checked where the dataset is built, approxtrain.data), with what each allows.
_CHECKS: dict[str, Check] = {
    "seed": integer(0, 2**63 - 1, "an integer in [0, 2**63 - 1]"),
    "trainer.epochs": integer(1, 10**6),
    "trainer.max_steps": or_null(integer(1)),
    "trainer.device": choice("auto", "cpu", "cuda"),
    "trainer.devices": integer(1),
    "trainer.distributed.backend": choice("auto", "gloo", "nccl"),
    "trainer.distributed.timeout_s": Check(lambda value: _is_number(value) and 0 < value <= 10**7,
                                           "a number of seconds in (0, 1e7]"),  # timedelta overflows far above
    "trainer.distributed.selection": choice(*selection_mode_names()),
    "trainer.distributed.sampled_allreduce": choice("auto", True, False),
    "trainer.amp": choice("auto", "bf16", "off"),
    "trainer.compile": SWITCH,
    "trainer.channels_last": choice("auto", True, False),
    "trainer.num_workers": integer(0),
    "trainer.deterministic": SWITCH,
    "trainer.grad_clip": or_null(number(0)),
    "trainer.log_every_n_steps": integer(1),
    "trainer.telemetry_every": integer(0),
    "trainer.checkpoint": SWITCH,
    "trainer.optimizer.name": choice("adam", "sgd"),
    "trainer.optimizer.lr": number(0),
    "trainer.optimizer.momentum": number(0, inclusive=True),
    "trainer.optimizer.nesterov": SWITCH,
    "trainer.optimizer.weight_decay": number(0, inclusive=True),
    "trainer.optimizer.betas": Check(_is_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "trainer.optimizer.eps": number(0),
    "trainer.scheduler.name": choice("none", "multistep", "exponential"),
    "trainer.scheduler.interval": choice("epoch", "step"),
    "trainer.scheduler.milestones": Check(_is_milestones, "a list of increasing integers >= 1, e.g. [30, 60]"),
    "trainer.scheduler.gamma": number(0),
    "trainer.scheduler.start": integer(0),
    "logger.name": choice("wandb", "none"),
    "dataset.batch_size": integer(1),
    "dataset.eval_batch_size": integer(1),
    "dataset.seq_len": integer(1),
    "dataset.download": SWITCH,
    "schedule.name": choice(*SCHEDULES),
    "schedule.exact_first": integer(0),
    "schedule.anneal": number(0, inclusive=True),
    "schedule.stages": integer(1),
    "schedule.exact_last": integer(0),
    "schedule.interval": choice(*INTERVALS),
    "schedule.budget": Check(lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1), e.g. 0.1"),
    "schedule.every": integer(1),
}
_K_LIMITS = ("min_k", "bwd_min_k", "wu_min_k", "align_k")  # the sampling fields that can raise k to n
_SOME_DATASETS = ("dataset.seq_len", "dataset.download")  # fields of some datasets only
_OPTIONAL = (*_SOME_DATASETS, *(key for key in _CHECKS if key.startswith("schedule.")))  # fields of some schedules only


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


def check_logger(cfg: Mapping[str, Any]) -> None:
    """The W&B logger's keys; :func:`validate` checks them, and so does the logger, which starts before the run's setup."""
    if lookup(cfg, "logger.name") != "wandb":
        return
    mode = lookup(cfg, "logger.mode")
    if mode not in _LOGGER_MODES:
        raise ConfigError(f"logger.mode={mode!r} is invalid; allowed: {', '.join(_LOGGER_MODES)}")
    timeout = lookup(cfg, "logger.init_timeout_s")
    if not number(0).accepts(timeout):
        raise ConfigError(f"logger.init_timeout_s={timeout!r} is invalid; allowed: a number of seconds > 0, e.g. 15")
    tags = lookup(cfg, "logger.tags")
    if not (isinstance(tags, (list, tuple)) and all(isinstance(tag, str) and tag for tag in tags)):
        raise ConfigError(f"logger.tags={tags!r} is invalid; allowed: a list of strings, e.g. logger.tags=[baseline,v2]")
    log_model = lookup(cfg, "logger.log_model")
    if not SWITCH.accepts(log_model):
        raise ConfigError(f"logger.log_model={log_model!r} is invalid; allowed: {SWITCH.allowed}")


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every value the run depends on; raise :class:`ConfigError` on the first bad one."""
    layer_rules(cfg)
    model = cfg.get("model") or {}
    try:
        model_spec(model).check_options(model_options(model))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    for dotted, check in _CHECKS.items():
        value = lookup(cfg, dotted, _MISSING)
        if value is _MISSING and dotted in _OPTIONAL:
            continue
        if value is _MISSING or not check.accepts(value):
            raise ConfigError(f"{dotted}={None if value is _MISSING else value!r} is invalid; allowed: {check.allowed}")
    optimizer = lookup(cfg, "trainer.optimizer")
    if optimizer["name"] == "sgd" and optimizer["nesterov"] and not optimizer["momentum"] > 0:  # torch's SGD rule
        raise ConfigError(f"trainer.optimizer.nesterov=true is invalid with trainer.optimizer.momentum={optimizer['momentum']!r}; "
                          "allowed: nesterov=true with a momentum > 0, or nesterov=false")
    selection = lookup(cfg, "trainer.distributed.selection")
    if not get_selection_mode(selection).same_on_every_rank and lookup(cfg, "trainer.distributed.sampled_allreduce") is True:
        shared = "/".join(name for name in selection_mode_names() if get_selection_mode(name).same_on_every_rank)
        raise ConfigError(f"trainer.distributed.sampled_allreduce=true is invalid with trainer.distributed.selection={selection} "
                          f"(the ranks keep different slices); allowed: false or auto, or selection={shared}")
    check_logger(cfg)
    try:
        schedule_fields(cfg.get("schedule"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def all_exact_warning(cfg: Mapping[str, Any], plan: Plan) -> str | None:
    """One line when the rules ask for sampling but the floors on ``k`` (``min_k``, ``bwd_min_k``,
    ``wu_min_k``) or ``align_k`` make every sampled layer keep all its pairs (k = n, no MACs saved),
    naming the keys that do it; None otherwise."""
    rules = layer_rules(cfg)
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
