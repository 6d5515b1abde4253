"""ResNet-50 (torchvision's), sized for any image dataset; ImageNet in the paper."""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet
from torchvision.models import resnet50 as torchvision_resnet50

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import register_model


@register_model("resnet50", kind="image")
def resnet50(info: DatasetInfo) -> ResNet:
    """torchvision's ResNet-50, randomly initialised, module names unchanged
    (``conv1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``).

    Input: ``(N, in_channels, H, W)``. Output: ``(N, num_classes)`` logits.
    With ``in_channels != 3``, ``conv1`` becomes a 7x7 stride-2 conv from ``in_channels``.
    Small images (H <= 64, e.g. CIFAR's 32x32) keep the ImageNet stem (7x7 stride-2 conv +
    max-pool, 32x32 -> 8x8 -> 1x1 at ``layer4``): this is ResNet-50 as the paper ran it, not
    a CIFAR variant; it runs, but is not tuned for small images.
    """
    model = torchvision_resnet50(weights=None, num_classes=info.num_classes)
    if info.in_channels != 3:
        model.conv1 = nn.Conv2d(info.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
