"""A model outside approxtrain, for the tests of ``model=custom`` (``_target_: byo_nets.SmallConvNet``)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallConvNet(nn.Module):
    """``conv`` -> ReLU -> global average pool -> ``hidden`` -> ReLU -> ``head``."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).relu().mean(dim=(2, 3))
        return self.head(self.hidden(x).relu())
