"""Wide residual networks (Zagoruyko & Komodakis 2016); WRN-28-10 for CIFAR-100 in the paper."""

from __future__ import annotations

from torch import Tensor, nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import DROPOUT, POSITIVE_INT, OptionCheck, register_model

# WRN-d-k: d = 6n + 4 (n basic blocks per group, 3 groups)
DEPTH = OptionCheck(
    lambda value: POSITIVE_INT.accepts(value) and value >= 10 and (value - 4) % 6 == 0,
    "6n + 4 with n >= 1 (10, 16, 22, 28, ...)",
)


class BasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-``conv1`` (3x3, stride) -> BN-ReLU-dropout-``conv2`` (3x3).

    Input: ``(N, in_planes, H, W)``. Output: ``(N, out_planes, H / stride, W / stride)``.
    When the shape changes, ``shortcut`` (1x1 conv, stride) maps the pre-activated input
    to the output shape; otherwise the input is added unchanged.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.shortcut: nn.Conv2d | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: ``conv1`` (3x3, 16) -> ``block1``/``block2``/``block3``
    (``(depth - 4) / 6`` basic blocks each, widths ``16k/32k/64k``, strides 1/2/2) -> BN -> ReLU
    -> global average pool -> ``fc``.

    Input: ``(N, C, H, W)``. Output: ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 100,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wrn depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"wrn widen_factor must be >= 1, got {widen_factor}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], blocks, stride=1, dropout=dropout)
        self.block2 = self._make_group(widths[1], widths[2], blocks, stride=2, dropout=dropout)
        self.block3 = self._make_group(widths[2], widths[3], blocks, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *(
                BasicBlock(in_planes if index == 0 else out_planes, out_planes, stride if index == 0 else 1, dropout)
                for index in range(blocks)
            )
        )

    def reset_parameters(self) -> None:
        """He-normal (fan-out) convolutions, unit BN scales, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (N, 16, H, W)
        x = self.block3(self.block2(self.block1(x)))  # (N, 64k, H/4, W/4)
        x = self.pool(self.relu(self.bn(x)))  # (N, 64k, 1, 1)
        return self.fc(self.flatten(x))


@register_model("wrn", kind="image", checks={"depth": DEPTH, "widen_factor": POSITIVE_INT, "dropout": DROPOUT})
def wrn(info: DatasetInfo, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 by default, as used for CIFAR-100 in the paper (36.5M parameters for 100 classes)."""
    return WideResNet(depth, widen_factor, num_classes=info.num_classes, in_channels=info.in_channels, dropout=dropout)
