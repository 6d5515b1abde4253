"""Any torchvision classification model by name: ``model=torchvision model.arch=resnet18``."""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import OptionCheck, register_model

log = logging.getLogger("approxtrain")

# The classification models only (not detection, segmentation, video, optical flow).
ARCHS = tuple(torchvision.models.list_models(module=torchvision.models))
ARCH = OptionCheck(
    lambda value: value in ARCHS,
    "a torchvision classification model, as torchvision.models.list_models(module=torchvision.models) "
    f"lists them ({len(ARCHS)}: {ARCHS[0]} ... {ARCHS[-1]}), e.g. resnet18, vit_b_16, convnext_tiny",
)
# Builder arguments some families need beyond num_classes: ViTs are built for one image size;
# the Inception nets' training outputs carry auxiliary logits, which the trainer's loss does not take.
_AUX_LOGITS = ("googlenet", "inception_v3")


def _arguments(arch: str, info: DatasetInfo) -> dict[str, object]:
    arguments: dict[str, object] = {"num_classes": info.num_classes}
    if arch.startswith("vit_"):
        arguments["image_size"] = info.image_size[0]
    if arch in _AUX_LOGITS:
        arguments.update(aux_logits=False, init_weights=True)
    return arguments


def _adapt_input_channels(model: nn.Module, in_channels: int) -> str:
    """Rebuild the first 3-channel Conv2d for ``in_channels`` inputs; returns its name.

    For one channel its weight is the sum of the random RGB filters (the init's fan-in scale
    kept: three channels' variance in one); otherwise nn.Conv2d's own initialisation.
    """
    name, conv = next(((name, module) for name, module in model.named_modules()
                       if isinstance(module, nn.Conv2d) and module.in_channels == 3), (None, None))
    if conv is None:
        raise ValueError(f"model.arch has no 3-channel Conv2d to take {in_channels}-channel images; allowed: 3-channel datasets")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    if in_channels == 1:
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return name


# image sides tried when an arch refuses the dataset's: the smallest it takes is the one to ask for
_TRIED_SIDES = (16, 32, 64, 96, 128, 160, 224)


def _size_failure(arch: str, info: DatasetInfo) -> str | None:
    """Why ``arch`` cannot take ``info``'s images (built for them, one example run on the meta device:
    no memory, no compute), in torch's words; None when it can."""
    try:
        with torch.device("meta"), torch.no_grad():
            model = torchvision.models.get_model(arch, weights=None, **_arguments(arch, info)).eval()
            model(torch.zeros(1, 3, *info.image_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


def _size_message(arch: str, info: DatasetInfo, failure: str) -> str:
    """One line: the dataset's image size, torch's reason, and the smallest ``dataset.image_size`` the arch takes."""
    height, width = info.image_size
    side = next((side for side in _TRIED_SIDES if side > min(height, width)
                 and _size_failure(arch, DatasetInfo(info.name, info.kind, 3, (side, side), info.num_classes)) is None), None)
    needed = f"dataset.image_size={side} or more (the smallest tried that it takes)" if side else \
        f"dataset.image_size of at least {_TRIED_SIDES[-1]}"
    return f"model.arch={arch!r} cannot take the {info.name} dataset's {height}x{width} images ({failure[:160]}); allowed: {needed}"


@register_model("torchvision", kind="image", checks={"arch": ARCH})
def torchvision_model(info: DatasetInfo, *, arch: str = "resnet18") -> nn.Module:
    """torchvision's ``arch``, randomly initialised, module names unchanged (``conv1``, ``fc``,
    ``features.0.0``, ``heads.head``), with ``num_classes`` outputs.

    Input: ``(N, in_channels, H, W)``. Output: ``(N, num_classes)`` logits. For
    ``in_channels != 3`` the first 3-channel conv is rebuilt for ``in_channels`` (logged);
    ViTs are built for ``H``. The stem is torchvision's (ImageNet's): small images (CIFAR's
    32x32) run, but strided stems shrink them fast, and a model whose stem shrinks an image
    below 1x1 fails on the first batch with torch's message.
    """
    failure = _size_failure(arch, info)
    if failure is not None:
        raise ValueError(_size_message(arch, info, failure))
    model = torchvision.models.get_model(arch, weights=None, **_arguments(arch, info))
    if info.in_channels != 3:
        name = _adapt_input_channels(model, info.in_channels)
        log.info("model torchvision %s: %s rebuilt for %d input channel(s) (was 3) to take %s", arch, name,
                 info.in_channels, info.name)
    return model
