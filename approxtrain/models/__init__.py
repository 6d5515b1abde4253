"""The paper's networks as plain ``nn.Module``s: ``build_model(name, info, **options)``.

Models know nothing of sampling; surgery swaps their ``nn.Linear``/``nn.Conv2d`` layers
from the outside, matching on qualified names (``fc1``, ``block2.0.conv1``, ``rnn.0.gates``).
Input and output layers are sized from the :class:`~approxtrain.data.DatasetInfo`.
"""

from __future__ import annotations

from torch import nn

from approxtrain.data import DATASETS, DatasetInfo
from approxtrain.data.synthetic import IMAGE_SHAPES, TEXT_VOCABULARIES
from approxtrain.models.cnn import ConvNet, cnn
from approxtrain.models.lstm import LSTMLanguageModel, UnrolledLSTM, lstm_medium
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


def _datasets_for(kind: str) -> str:
    """Human list of the datasets of ``kind``, e.g. ``ptb, synthetic (like=ptb)``."""
    likes = TEXT_VOCABULARIES if kind == "text" else IMAGE_SHAPES
    real = [name for name in DATASETS if name != "synthetic" and (name in _TEXT_DATASETS) == (kind == "text")]
    return f"{', '.join(real)}, synthetic (like={'|'.join(likes)})"


def build_model(name: str, info: DatasetInfo, **options) -> nn.Module:
    """Model ``name`` sized for dataset ``info``; ``options`` override the paper's defaults.

    Raises ``ValueError`` for an unknown model or a text/image mismatch and ``TypeError``
    for an unknown option (one-line messages).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    kind = MODEL_KIND[name]
    if info.kind != kind:
        raise ValueError(
            f"model {name!r} needs {'a text' if kind == 'text' else 'an image'} dataset but {info.name!r} is "
            f"{'a text' if info.kind == 'text' else 'an image'} dataset; allowed for {name}: {_datasets_for(kind)}"
        )
    unknown = sorted(set(options) - set(MODEL_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(MODEL_OPTIONS[name]) or "none"
        raise TypeError(f"unknown option {unknown[0]!r} for model {name!r}; allowed: {allowed}")

    if name == "mlp":
        return mlp(info.in_channels, info.image_size, info.num_classes, **options)
    if name == "cnn":
        return cnn(info.in_channels, info.image_size, info.num_classes, **options)
    if name == "wrn":
        return WideResNet(num_classes=info.num_classes, in_channels=info.in_channels, **options)
    if name == "resnet50":
        return resnet50(info.in_channels, info.num_classes)
    return lstm_medium(info.vocab_size, **options)
