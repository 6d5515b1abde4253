"""The layers surgery can sample, and how: one :class:`LayerAdapter` per kind of layer.

``nn.Linear`` and ``nn.Conv2d`` (and their subclasses that keep their computation), their
parametrized forms (``weight_norm``, ``spectral_norm``: the computed weight is sampled), and the
well-known third-party layers that compute a Linear's product -- Hugging Face's ``Conv1D``
(GPT-2 family). A third-party class is recognised by its qualified name, so its library is
never imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from approxtrain.modules import ApproxConv2d, ApproxLinear, SampledLayer, approx_conv1d
from approxtrain.sampling import SamplingConfig


@dataclass(frozen=True)
class LayerAdapter:
    """How surgery samples one kind of layer.

    ``kind``: the product it computes, as a layer rule's ``type`` names it (``Linear`` or
    ``Conv2d``); ``pairs``/``outputs``: its product's n and output features (channels);
    ``approximate``: its sampled twin sharing its Parameters; ``note``: what the plan says of
    a sampled layer of this kind (empty for the plain layers)."""

    kind: str
    pairs: Callable[[nn.Module], int]
    outputs: Callable[[nn.Module], int]
    approximate: Callable[[nn.Module, SamplingConfig, torch.Generator | None], SampledLayer]
    note: str = ""


LINEAR = LayerAdapter("Linear", lambda layer: layer.in_features, lambda layer: layer.out_features, ApproxLinear.from_linear)
CONV2D = LayerAdapter("Conv2d", lambda layer: layer.in_channels // layer.groups, lambda layer: layer.out_channels,
                      ApproxConv2d.from_conv2d)
HF_CONV1D = LayerAdapter("Linear", lambda layer: layer.nx, lambda layer: layer.nf, approx_conv1d,
                         "transformers Conv1D (x @ W, W stored n x out): sampled as a Linear")
# Third-party layers by the qualified name of their class (or of a base class).
BY_CLASS_NAME = {"transformers.pytorch_utils.Conv1D": HF_CONV1D}


def _plain_adapter(module: nn.Module) -> LayerAdapter | None:
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV2D
    for cls in type(module).__mro__:
        adapter = BY_CLASS_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is not None:
            return adapter
    return None


def adapter_of(module: nn.Module) -> LayerAdapter | None:
    """The adapter that samples ``module`` (a sampled layer: the one it came from); None for a layer
    surgery cannot sample.

    Examples::

        >>> adapter_of(nn.Linear(4, 2)).kind, adapter_of(nn.Conv2d(1, 2, 3)).pairs(nn.Conv2d(1, 2, 3))
        ('Linear', 1)
        >>> adapter_of(nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))).note
        'weight computed by its parametrization (weight_norm, ...): the computed weight is sampled'
        >>> adapter_of(nn.Conv1d(1, 2, 3)) is None
        True
    """
    adapter = _plain_adapter(module)
    if adapter is not None and parametrize.is_parametrized(module, "weight"):
        return replace(adapter, note="weight computed by its parametrization (weight_norm, ...): the computed weight is sampled")
    return adapter
