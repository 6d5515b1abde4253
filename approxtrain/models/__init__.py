"""The paper's networks as plain ``nn.Module``s, one registered builder per model.

``build_model(model_config, info)`` builds the model a ``model`` config describes
(``{"name": "wrn", "depth": 16}``), sized from the dataset's :class:`~approxtrain.data.DatasetInfo`.
Models know nothing of sampling; surgery swaps their ``nn.Linear``/``nn.Conv2d`` layers
from the outside, matching on qualified names (``fc1``, ``block2.0.conv1``, ``rnn.0.gates``).

Every module of this package is imported here, so a model file dropped into it
registers itself (see :mod:`approxtrain.models.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil

from approxtrain.models.cnn import ConvNet, cnn
from approxtrain.models.lstm import LSTMLanguageModel, UnrolledLSTM, lstm_medium
from approxtrain.models.mlp import MLP, mlp
from approxtrain.models.registry import (
    DROPOUT,
    POSITIVE_INT,
    ModelSpec,
    OptionCheck,
    build_model,
    list_models,
    model_options,
    model_spec,
    one_of,
    register_model,
)
from approxtrain.models.resnet import resnet50
from approxtrain.models.wrn import WideResNet, wrn

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DROPOUT",
    "MLP",
    "POSITIVE_INT",
    "ConvNet",
    "LSTMLanguageModel",
    "ModelSpec",
    "OptionCheck",
    "UnrolledLSTM",
    "WideResNet",
    "build_model",
    "cnn",
    "list_models",
    "lstm_medium",
    "mlp",
    "model_options",
    "model_spec",
    "one_of",
    "register_model",
    "resnet50",
    "wrn",
]
