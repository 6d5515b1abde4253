"""The model registry: one :class:`ModelSpec` per model, made by :func:`register_model`.

A model is a torchvision-style builder function ``builder(info, *, option=default, ...)``:
it gets the :class:`~approxtrain.data.DatasetInfo` to size its input and output layers,
and its keyword-only parameters are the model's options, their defaults the paper's.
Its config (``configs/model/<name>.yaml``) names it and lists every option with the same
default; it also holds what composing a run needs before any model code is imported:
the paper's dataset and the paper's layer rules. A builder with ``**arguments`` (the
``custom`` model) passes every further option on unchecked: the model it builds checks them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from approxtrain.checks import Check, choice, fraction, integer
from approxtrain.data import DATASETS, DatasetInfo
from approxtrain.data.synthetic import IMAGE_SHAPES, TEXT_VOCABULARIES

KINDS = ("image", "text")
# Keys of a model config that describe the model rather than set a builder option.
CONFIG_KEYS = ("name", "module", "paper_dataset", "paper_rules")


OptionCheck = Check  # an option's test and the allowed values as an error message names them
POSITIVE_INT = integer(1)
DROPOUT = fraction()
one_of = choice


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder, the data it consumes and its option checks.

    ``kind``: ``"image"`` (input ``(N, C, H, W)`` float) or ``"text"`` (input ``(N, T)``
    int64 token ids); it also says which example input traces the model's layers.
    None: the model takes either (its config says how it is sized).
    """

    name: str
    builder: Callable[..., nn.Module]
    kind: str | None
    checks: Mapping[str, OptionCheck]

    @property
    def options(self) -> dict[str, Any]:
        """Each option and its default: the builder's keyword-only parameters."""
        parameters = inspect.signature(self.builder).parameters.values()
        return {parameter.name: parameter.default for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY}

    @property
    def passes_on_options(self) -> bool:
        """Whether the builder takes ``**arguments``: options beyond :attr:`options` go to the model it builds."""
        parameters = inspect.signature(self.builder).parameters.values()
        return any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Reject an option the model does not take (``TypeError``) or a bad value (``ValueError``)."""
        unknown = sorted(set(options) - set(self.checks))
        if unknown and not self.passes_on_options:
            allowed = ", ".join(self.checks) or "none"
            raise TypeError(f"unknown option {unknown[0]!r} for model {self.name!r}; allowed: {allowed}")
        for option, value in options.items():
            if option in self.checks and not self.checks[option].accepts(value):
                raise ValueError(f"model.{option}={value!r} is invalid; allowed: {self.checks[option].allowed}")


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, kind: str | None, checks: Mapping[str, OptionCheck] | None = None) -> Callable:
    """Decorator: register ``builder(info, *, option=default, ...)`` as model ``name``.

    ``checks`` holds one :class:`OptionCheck` per option, so every option is validated
    where the config enters. Raises ``ValueError``/``TypeError`` for a spec that cannot work.
    """

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        spec = ModelSpec(name, builder, kind, dict(checks or {}))
        if kind is not None and kind not in KINDS:
            raise ValueError(f"model {name!r}: kind={kind!r} is invalid; allowed: {', '.join(KINDS)}")
        options = spec.options
        if set(options) != set(spec.checks) or inspect.Parameter.empty in options.values():
            raise TypeError(
                f"model {name!r}: every keyword-only option of {builder.__qualname__} needs a default and a check; "
                f"options {', '.join(options) or 'none'}, checks {', '.join(spec.checks) or 'none'}"
            )
        known = _MODELS.get(name)
        if known is not None and (known.builder.__module__, known.builder.__qualname__) != (builder.__module__, builder.__qualname__):
            raise ValueError(f"model {name!r} is already registered by {known.builder.__module__}.{known.builder.__qualname__}")
        _MODELS[name] = spec
        return builder

    return register


def list_models() -> list[str]:
    """The registered models' names, sorted."""
    return sorted(_MODELS)


def model_spec(model: Mapping[str, Any]) -> ModelSpec:
    """The spec of a model config (``name``, and ``module`` for a model defined outside
    :mod:`approxtrain.models`: imported first, which registers it)."""
    module = model.get("module")
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"model.module={module!r} cannot be imported ({error}); is its folder on PYTHONPATH?") from None
    name = model.get("name")
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    return _MODELS[name]


def model_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The builder options in a model config: all of it but :data:`CONFIG_KEYS`."""
    return {key: value for key, value in model.items() if key not in CONFIG_KEYS}


def _datasets_for(kind: str) -> str:
    """Human list of the datasets of ``kind``, e.g. ``ptb, synthetic (like=ptb)``."""
    likes = TEXT_VOCABULARIES if kind == "text" else IMAGE_SHAPES
    real = [name for name in DATASETS if name != "synthetic" and (name in TEXT_VOCABULARIES) == (kind == "text")]
    return f"{', '.join(real)}, synthetic (like={'|'.join(likes)})"


def build_model(model: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
    """The model a resolved ``model`` config describes, sized for dataset ``info``.

    Raises ``ValueError`` for an unknown model, a bad option value or a text/image
    mismatch and ``TypeError`` for an unknown option (one-line messages).
    """
    spec = model_spec(model)
    options = model_options(model)
    spec.check_options(options)
    if spec.kind is not None and info.kind != spec.kind:
        article = {"image": "an image", "text": "a text"}
        raise ValueError(
            f"model {spec.name!r} needs {article[spec.kind]} dataset but {info.name!r} is {article[info.kind]} dataset; "
            f"allowed for {spec.name}: {_datasets_for(spec.kind)}"
        )
    return spec.builder(info, **options)
