"""The paper's networks as plain ``nn.Module``s: ``build_model(name, info, **options)``.

Models know nothing of sampling; surgery swaps their ``nn.Linear``/``nn.Conv2d`` layers
from the outside, matching on qualified names (``fc1``, ``block2.0.conv1``, ``rnn.0.gates``).
Input and output layers are sized from the :class:`~approxtrain.data.DatasetInfo`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from approxtrain.data import DATASETS, DatasetInfo
from approxtrain.data.synthetic import IMAGE_SHAPES, TEXT_VOCABULARIES
from approxtrain.models.cnn import ConvNet, cnn
from approxtrain.models.lstm import CELLS, LSTMLanguageModel, UnrolledLSTM, lstm_medium
from approxtrain.models.mlp import MLP, mlp
from approxtrain.models.resnet import resnet50
from approxtrain.models.wrn import WideResNet, wrn28_10

__all__ = [
    "MODELS",
    "MODEL_KIND",
    "MODEL_OPTIONS",
    "MLP",
    "ConvNet",
    "LSTMLanguageModel",
    "UnrolledLSTM",
    "WideResNet",
    "build_model",
    "check_model_options",
    "model_options",
    "cnn",
    "lstm_medium",
    "mlp",
    "resnet50",
    "wrn28_10",
]

MODELS = ("mlp", "cnn", "lstm", "wrn", "resnet50")
# The kind of dataset each model consumes.
MODEL_KIND = {"mlp": "image", "cnn": "image", "lstm": "text", "wrn": "image", "resnet50": "image"}
# The options build_model accepts for each model (defaults: the paper's).
MODEL_OPTIONS = {
    "mlp": ("hidden",),
    "cnn": ("hidden", "dropout"),
    "lstm": ("hidden", "layers", "dropout", "cell"),
    "wrn": ("depth", "widen_factor", "dropout"),
    "resnet50": (),
}
_TEXT_DATASETS = ("ptb",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Each option's check and the values it allows, as the error message names them.
_OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "widen_factor": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "depth": (lambda v: _is_int(v) and v >= 10 and (v - 4) % 6 == 0, "6n + 4 with n >= 1 (10, 16, 22, 28, ...)"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "cell": (lambda v: v in CELLS, ", ".join(CELLS)),
}


# Keys of a model config that describe it rather than set a build option.
_CONFIG_ONLY_KEYS = ("name", "paper_dataset")


def model_options(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`build_model` options in a model config: all of it but ``name`` and ``paper_dataset``."""
    return {key: value for key, value in model_config.items() if key not in _CONFIG_ONLY_KEYS}


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Reject an unknown model, an option ``name`` does not take (``TypeError``) or a bad
    option value (``ValueError``), each with a one-line message naming what is allowed."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(MODEL_OPTIONS[name]) or "none"
        raise TypeError(f"unknown option {unknown[0]!r} for model {name!r}; allowed: {allowed}")
    for option, value in options.items():
        check, allowed = _OPTION_CHECKS[option]
        if not check(value):
            raise ValueError(f"model.{option}={value!r} is invalid; allowed: {allowed}")


def _datasets_for(kind: str) -> str:
    """Human list of the datasets of ``kind``, e.g. ``ptb, synthetic (like=ptb)``."""
    likes = TEXT_VOCABULARIES if kind == "text" else IMAGE_SHAPES
    real = [name for name in DATASETS if name != "synthetic" and (name in _TEXT_DATASETS) == (kind == "text")]
    return f"{', '.join(real)}, synthetic (like={'|'.join(likes)})"


def build_model(name, info: DatasetInfo, **options) -> nn.Module:
    """Model ``name`` sized for dataset ``info``; ``options`` override the paper's defaults.

    Raises ``ValueError`` for an unknown model, a bad option value or a text/image
    mismatch and ``TypeError`` for an unknown option (one-line messages).
    """
    if isinstance(name, Mapping):  # TEMP shim until the registry lands
        name, options = name["name"], model_options(name)
    check_model_options(name, options)
    kind = MODEL_KIND[name]
    if info.kind != kind:
        raise ValueError(
            f"model {name!r} needs {'a text' if kind == 'text' else 'an image'} dataset but {info.name!r} is "
            f"{'a text' if info.kind == 'text' else 'an image'} dataset; allowed for {name}: {_datasets_for(kind)}"
        )
    if name == "mlp":
        return mlp(info.in_channels, info.image_size, info.num_classes, **options)
    if name == "cnn":
        return cnn(info.in_channels, info.image_size, info.num_classes, **options)
    if name == "wrn":
        return WideResNet(num_classes=info.num_classes, in_channels=info.in_channels, **options)
    if name == "resnet50":
        return resnet50(info.in_channels, info.num_classes)
    return lstm_medium(info.vocab_size, **options)
