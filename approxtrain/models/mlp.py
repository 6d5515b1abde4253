"""Multi-layer perceptron for MNIST (Adelman & Silberstein 2018, supplementary material)."""

from __future__ import annotations

from torch import Tensor, nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import POSITIVE_INT, register_model


class MLP(nn.Module):
    """Flatten -> ``fc1`` -> ReLU -> ``fc2`` -> ReLU -> ``fc3``.

    Input: ``(N, C, H, W)`` (or any ``(N, *)`` with ``in_features`` elements per sample).
    Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 500) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


@register_model("mlp", kind="image", checks={"hidden": POSITIVE_INT})
def mlp(info: DatasetInfo, *, hidden: int = 500) -> MLP:
    """The paper's MNIST MLP, 784-500-500-10 for ``(1, 28, 28)`` inputs and 10 classes."""
    height, width = info.image_size
    return MLP(info.in_channels * height * width, info.num_classes, hidden=hidden)
