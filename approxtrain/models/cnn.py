"""Convolutional network for MNIST: TensorFlow's ``mnist_deep`` (Adelman & Silberstein 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import DROPOUT, POSITIVE_INT, register_model


class ConvNet(nn.Module):
    """``conv1`` (5x5, 32) -> ReLU -> maxpool 2 -> ``conv2`` (5x5, 64) -> ReLU -> maxpool 2
    -> flatten -> ``fc1`` (1024) -> ReLU -> dropout -> ``fc2``.

    Input: ``(N, C, H, W)``. Output: ``(N, num_classes)`` logits. ``fc1`` has
    ``64 * (H // 4) * (W // 4)`` inputs (3136 for 28x28, 256 for 8x8).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        hidden: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        height, width = image_size
        if height < 4 or width < 4:
            raise ValueError(f"cnn needs images of at least 4x4, got {height}x{width}")
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # (N, 32, H/2, W/2)
        x = self.pool(self.relu(self.conv2(x)))  # (N, 64, H/4, W/4)
        x = self.dropout(self.relu(self.fc1(self.flatten(x))))  # (N, hidden)
        return self.fc2(x)


@register_model("cnn", kind="image", checks={"hidden": POSITIVE_INT, "dropout": DROPOUT})
def cnn(info: DatasetInfo, *, hidden: int = 1024, dropout: float = 0.5) -> ConvNet:
    """The paper's MNIST CNN (3136 -> 1024 -> 10 fully connected layers for 1x28x28)."""
    return ConvNet(info.in_channels, info.image_size, info.num_classes, hidden=hidden, dropout=dropout)
