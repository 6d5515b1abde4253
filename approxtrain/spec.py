"""The run spec: a run config as typed objects (:class:`RunSpec`); the ``trainer`` group's fields
each declared once, with its default, its check and what it means.

``configs/trainer/default.yaml`` takes every field from here (:func:`trainer_fields`, stored in
Hydra's ConfigStore as ``trainer_fields``); :func:`trainer_spec` turns a composed config's
``trainer`` mapping into a :class:`TrainerSpec`, checking every value (a bad one is a
:class:`~approxtrain.checks.ConfigError` naming the key, the value and what is allowed).
No torch here: the command line composes and checks configs before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from approxtrain.checks import POSITIVE_INT, SWITCH, Check, ConfigError, choice, integer, is_int, is_number, number, or_null
from approxtrain.data.info import DATASET_FIELDS
from approxtrain.run.selection_modes import get_selection_mode, selection_mode_names


def _is_betas(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(beta) and 0 <= beta < 1 for beta in value)


def _is_milestones(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and all(is_int(step) and step >= 1 for step in value)
            and all(a < b for a, b in zip(value, value[1:])))


def _is_dotted(value: Any) -> bool:
    return isinstance(value, str) and "." in value and all(part.isidentifier() for part in value.split("."))


def _is_keywords(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) and key.isidentifier() for key in value)


def _field(default: Any, check: Check, doc: str) -> Any:
    """A spec field: its default, its :class:`~approxtrain.checks.Check` and one line of what it means."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class OptimizerSpec:
    """``trainer.optimizer``."""

    name: str = _field("adam", choice("adam", "adamw", "sgd"), "adam | adamw (decoupled weight decay) | sgd")
    lr: float = _field(0.001, number(0), "learning rate")
    momentum: float = _field(0.9, number(0, inclusive=True), "sgd: momentum")
    nesterov: bool = _field(False, SWITCH, "sgd: Nesterov momentum (needs momentum > 0)")
    weight_decay: float = _field(0.0, number(0, inclusive=True),
                                 "adam, sgd: L2 penalty; adamw: decoupled weight decay (e.g. 0.05)")
    betas: list = _field([0.9, 0.999], Check(_is_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"), "adam, adamw: betas")
    eps: float = _field(1.0e-08, number(0), "adam, adamw: eps")
    _target_: str | None = _field(None, or_null(Check(_is_dotted, "a class's dotted path, e.g. torch.optim.AdamW")),
                                  "any optimizer class instead of name's (name, momentum, nesterov, betas and eps "
                                  "then unused): it gets lr, weight_decay and kwargs")
    kwargs: dict = _field({}, Check(_is_keywords, "a mapping of keyword arguments, e.g. +trainer.optimizer.kwargs.amsgrad=true"),
                          "_target_: more keyword arguments for its class (add each with +, e.g. +trainer.optimizer.kwargs.alpha=0.9)")


# Optimizer presets a model config picks (configs/model/*.yaml): AdamW with decoupled weight decay is the
# recipe of the models brought along (torchvision, custom, transformer); the paper models keep adam/sgd.
OPTIMIZER_PRESETS: dict[str, dict[str, Any]] = {"adamw": {"name": "adamw", "weight_decay": 0.05}}


@dataclass(frozen=True)
class SchedulerSpec:
    """``trainer.scheduler``: the learning-rate schedule."""

    name: str = _field("none", choice("none", "multistep", "exponential", "warmup_cosine"),
                       "none | multistep | exponential | warmup_cosine (linear warmup, then cosine decay to min_lr)")
    interval: str = _field("epoch", choice("epoch", "step"), "stepped per epoch or per optimizer step")
    milestones: list = _field([], Check(_is_milestones, "a list of increasing integers >= 1, e.g. [30, 60]"),
                              "multistep: x gamma at each of these intervals")
    gamma: float = _field(0.1, number(0), "the factor per decay")
    start: int = _field(0, integer(0), "exponential: decay by gamma per interval after this many")
    warmup_steps: int = _field(0, integer(0), "warmup_cosine: intervals of linear warmup to trainer.optimizer.lr")
    min_lr: float = _field(0.0, number(0, inclusive=True), "warmup_cosine: the rate the cosine reaches at the run's end")
    _target_: str | None = _field(None, or_null(Check(_is_dotted, "a class's dotted path, e.g. torch.optim.lr_scheduler.StepLR")),
                                  "any learning-rate scheduler class instead of name's (the fields above but interval "
                                  "then unused): it gets the optimizer and kwargs, and is stepped per interval")
    kwargs: dict = _field({}, Check(_is_keywords, "a mapping of keyword arguments, e.g. +trainer.scheduler.kwargs.step_size=10"),
                          "_target_: keyword arguments for its class (add each with +, e.g. +trainer.scheduler.kwargs.gamma=0.5)")


@dataclass(frozen=True)
class DistributedSpec:
    """``trainer.distributed``: how the ranks of a data-parallel run work together."""

    backend: str = _field("auto", choice("auto", "gloo", "nccl"), "auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    timeout_s: float = _field(300, Check(lambda value: is_number(value) and 0 < value <= 10**7, "a number of seconds in (0, 1e7]"),
                              # (timedelta overflows far above 1e7 s)
                              "a collective waits this long for a dead or stuck rank; then the run fails")
    selection: str = _field("global", choice(*selection_mode_names()),
                            "global (input norms all-reduced: one process on the global batch) | weights | local")
    sampled_allreduce: Any = _field("auto", choice("auto", True, False),
                                    "all-reduce only the kept slices of sampled weights' gradients; auto: on unless local")


@dataclass(frozen=True)
class TrainerSpec:
    """``trainer``: how a run trains."""

    epochs: int = _field(20, integer(1, 10**6), "epochs to train")
    max_steps: int | None = _field(None, or_null(integer(1)),
                                   "stop after this many optimizer steps (smoke runs, iteration-based schedules)")
    device: str = _field("auto", choice("auto", "cpu", "cuda"), "auto | cpu | cuda")
    devices: int = _field(1, integer(1), "processes (ranks) this run starts on this node, data-parallel; dataset.batch_size "
                          "is per process (under torchrun or a SLURM job with several tasks the launcher's ranks are the devices: 1)")
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    amp: str = _field("auto", choice("auto", "bf16", "off"), "auto (bf16 on GPU, off on CPU) | bf16 | off")
    compile: bool = _field(False, SWITCH, "torch.compile the model")
    channels_last: Any = _field("auto", choice("auto", True, False), "auto (on GPU for image models) | true | false")
    num_workers: int = _field(2, integer(0), "data loader worker processes")
    deterministic: bool = _field(False, SWITCH, "deterministic algorithms (slower)")
    grad_clip: float | None = _field(None, or_null(number(0)), "clip the gradients' global norm to this")
    log_every_n_steps: int = _field(20, integer(1), "read the training loss (one host sync), check it is finite and report it "
                                    "every N optimizer steps (several ranks also vote on a stop then)")
    telemetry_every: int = _field(0, integer(0), "per sampled layer, every N steps: forward error, discarded score share, "
                                  "weight-gradient cosine vs exact (one extra exact forward+backward on that batch); 0 = off")
    checkpoint: bool = _field(True, SWITCH, "write checkpoints/last.pt and best.pt after every epoch")
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)

    def __post_init__(self) -> None:
        for group in ("optimizer", "scheduler"):
            _check_target_alone(getattr(self, group), f"trainer.{group}")
        optimizer = self.optimizer
        if optimizer.name == "sgd" and optimizer.nesterov and not optimizer.momentum > 0:  # torch's SGD rule
            raise ConfigError(f"trainer.optimizer.nesterov=true is invalid with trainer.optimizer.momentum={optimizer.momentum!r}; "
                              "allowed: nesterov=true with a momentum > 0, or nesterov=false")
        selection = self.distributed.selection
        if not get_selection_mode(selection).same_on_every_rank and self.distributed.sampled_allreduce is True:
            shared = "/".join(name for name in selection_mode_names() if get_selection_mode(name).same_on_every_rank)
            raise ConfigError(f"trainer.distributed.sampled_allreduce=true is invalid with trainer.distributed.selection={selection} "
                              f"(the ranks keep different slices); allowed: false or auto, or selection={shared}")


# The fields a class named by `_target_` gets (the rest configure the named presets only).
TARGET_FIELDS = ("_target_", "kwargs", "lr", "weight_decay", "interval")


def _check_target_alone(group: Any, prefix: str) -> None:
    """With ``_target_`` set, a preset-only field changed from its default would be silently unused: refuse it."""
    if group._target_ is None:
        if group.kwargs:
            raise ConfigError(f"{prefix}.kwargs={dict(group.kwargs)!r} is invalid without {prefix}._target_; "
                              f"allowed: {{}}, or set {prefix}._target_ to the class they are for")
        return
    for spec_field in fields(group):
        default = spec_field.default if spec_field.default is not MISSING else spec_field.default_factory()
        if spec_field.name not in (*TARGET_FIELDS, "name") and getattr(group, spec_field.name) != default:
            value = getattr(group, spec_field.name)
            raise ConfigError(f"{prefix}.{spec_field.name}={value!r} is invalid with {prefix}._target_={group._target_} "
                              f"(it configures the named presets only); allowed: {default!r}, or "
                              f"+{prefix}.kwargs.{spec_field.name}={value!r} to pass it to the class")


@dataclass(frozen=True)
class DatasetSpec:
    """``dataset``: which dataset, its batch sizes, and its own fields, each checked
    (``configs/dataset/<name>.yaml``; :data:`~approxtrain.data.info.DATASET_FIELDS` says which and what each may be)."""

    name: str
    batch_size: int  # examples per training step and rank
    eval_batch_size: int
    fields: Mapping[str, Any]  # the dataset's own: root, download, image_size, val_fraction, seq_len, ...

    def get(self, name: str, default: Any = None) -> Any:
        """The dataset's own field ``name`` (``default`` where this dataset has no such field)."""
        return self.fields.get(name, default)


def _named_group(group: str, values: Any, kinds: Mapping[str, Mapping[str, Check]],
                 common: Mapping[str, Check] | None = None) -> tuple[str, dict[str, Any]]:
    """A group that a ``name`` picks the fields of (``kinds[name]``, beside ``common``): the name and
    exactly those fields, each checked (:class:`ConfigError` on the first bad, unknown or missing one)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{group}={values!r} is invalid; allowed: a mapping with a name: {', '.join(kinds)}")
    name = choice(*kinds)(f"{group}.name", values.get("name"))
    checks = {**(common or {}), **kinds[name]}
    expected = ["name", *checks]
    unknown = sorted(set(values) - set(expected))
    missing = [key for key in expected if key not in values]
    if unknown or missing:
        problem = f"{group}.{unknown[0]} is not a field of {group} {name}" if unknown else f"{group}.{missing[0]} is missing"
        raise ConfigError(f"{problem}; allowed: the fields of {group} {name}: {', '.join(expected)}")
    return name, {key: check(f"{group}.{key}", values[key]) for key, check in checks.items()}


_BATCH_SIZES = {"batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT}


def dataset_spec(dataset: Mapping[str, Any]) -> DatasetSpec:
    """The ``dataset`` group of a composed config as a :class:`DatasetSpec` (:class:`ConfigError` naming the
    first bad, unknown or missing field)."""
    name, values = _named_group("dataset", dataset, DATASET_FIELDS, _BATCH_SIZES)
    return DatasetSpec(name, values.pop("batch_size"), values.pop("eval_batch_size"), values)


def _is_tags(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(tag, str) and tag for tag in value)


_NAME = Check(lambda value: isinstance(value, str) and bool(value), "a name")
# The logger's fields by logger (configs/logger/<name>.yaml holds their defaults).
LOGGER_FIELDS: dict[str, dict[str, Check]] = {
    "wandb": {"project": _NAME, "entity": or_null(_NAME), "mode": choice("auto", "online", "offline", "disabled"),
              "init_timeout_s": Check(number(0).accepts, "a number of seconds > 0, e.g. 15"), "group": or_null(_NAME),
              "tags": Check(_is_tags, "a list of strings, e.g. logger.tags=[baseline,v2]"), "log_model": SWITCH},
    "none": {},
}


@dataclass(frozen=True)
class LoggerSpec:
    """``logger``: where a run's metrics go besides ``results.json`` -- W&B (``wandb``) or nowhere (``none``)."""

    name: str
    fields: Mapping[str, Any]  # the logger's own (LOGGER_FIELDS), each checked


def named_group_checks() -> dict[str, Check]:
    """What each key of the ``dataset`` and ``logger`` groups may be, by dotted key (for the docs)."""
    checks = {f"dataset.{key}": check for key, check in _BATCH_SIZES.items()}
    for group, kinds in (("dataset", DATASET_FIELDS), ("logger", LOGGER_FIELDS)):
        checks.update({f"{group}.{key}": check for fields_ in kinds.values() for key, check in fields_.items()})
    return checks


def logger_spec(logger: Mapping[str, Any]) -> LoggerSpec:
    """The ``logger`` group of a composed config as a :class:`LoggerSpec` (:class:`ConfigError` on a bad field)."""
    return LoggerSpec(*_named_group("logger", logger, LOGGER_FIELDS))


@dataclass(frozen=True)
class RunSpec:
    """A run's config, checked (:func:`approxtrain.config.validate` makes it): the trainer, dataset and
    logger groups as their specs, the schedule's checked fields, the layer rules built once (each
    completed from the sampler group and the top-level ratio), and the resolved ``config`` mapping itself
    (the model group is read by its registry, which checks its options; checkpoints and W&B keep it whole)."""

    trainer: TrainerSpec
    dataset: DatasetSpec
    logger: LoggerSpec
    schedule: Mapping[str, Any]  # its name and fields, checked (approxtrain.schedule.schedule_fields)
    model: Mapping[str, Any]  # the model group; its registry entry checked its options
    rules: list  # approxtrain.surgery.LayerRule, in order
    ratio: float
    seed: int
    resume: str | None
    config: Mapping[str, Any]

    @property
    def batch_size(self) -> int:
        """Examples per step and rank (``dataset.batch_size``)."""
        return self.dataset.batch_size


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` from ``values`` (a composed config's mapping at ``prefix``), every field checked."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}={values!r} is invalid; allowed: a mapping of {', '.join(f.name for f in fields(cls))}")
    arguments = {}
    for spec_field in fields(cls):
        key = f"{prefix}.{spec_field.name}"
        if spec_field.name not in values:
            raise ConfigError(f"{key} is missing; allowed: {_allowed(spec_field)}")
        value = values[spec_field.name]
        if "check" in spec_field.metadata:
            arguments[spec_field.name] = spec_field.metadata["check"](key, value)
        else:  # a nested group
            arguments[spec_field.name] = _build(spec_field.default_factory, value, key)
    return cls(**arguments)


def _allowed(spec_field: Any) -> str:
    return spec_field.metadata["check"].allowed if "check" in spec_field.metadata else "a mapping"


def trainer_spec(trainer: Mapping[str, Any]) -> TrainerSpec:
    """The ``trainer`` group of a composed config as a :class:`TrainerSpec` (:class:`ConfigError` on a bad value)."""
    return _build(TrainerSpec, trainer, "trainer")


def trainer_fields() -> dict[str, Any]:
    """Every ``trainer`` field with its default (what ``configs/trainer/default.yaml`` starts from)."""
    return asdict(TrainerSpec())


def field_docs(cls: type = TrainerSpec, prefix: str = "trainer") -> dict[str, tuple[Any, str, str]]:
    """``{dotted key: (default, allowed, meaning)}`` for every field of ``cls`` (for the docs and ``--help``)."""
    docs = {}
    for spec_field in fields(cls):
        key = f"{prefix}.{spec_field.name}"
        if "check" in spec_field.metadata:
            default = spec_field.default if spec_field.default is not MISSING else spec_field.default_factory()
            docs[key] = (default, spec_field.metadata["check"].allowed, spec_field.metadata["doc"])
        elif is_dataclass(spec_field.default_factory):
            docs.update(field_docs(spec_field.default_factory, key))
    return docs
