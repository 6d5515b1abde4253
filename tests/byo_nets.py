"""A model outside approxtrain, for the tests of ``model=custom`` (``_target_: byo_nets.SmallConvNet``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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


class DropoutProbe(nn.Module):
    """Average pool to 4x4 -> ``hidden`` -> ReLU -> dropout -> ``head``; saves its first training
    step's dropout mask and the seed of the stream it came from (``torch.initial_seed()``) to
    ``$DROPOUT_PROBE_DIR/rank<rank>.pt`` (the tests of per-rank dropout)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, p: float = 0.5) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Linear(in_channels * 16, width)
        self.head = nn.Linear(width, num_classes)
        self.p, self.saved = p, False

    def forward(self, x: Tensor) -> Tensor:
        x = self.hidden(self.pool(x).flatten(1)).relu()
        if self.training:
            mask = torch.nn.functional.dropout(torch.ones_like(x), self.p)  # what nn.Dropout draws
            self._save(mask != 0)
            x = x * mask
        return self.head(x)

    def _save(self, mask: Tensor) -> None:
        folder = os.environ.get("DROPOUT_PROBE_DIR")
        if folder and not self.saved:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            torch.save({"mask": mask, "seed": torch.initial_seed()}, Path(folder) / f"rank{rank}.pt")
            self.saved = True


class FunctionalNet(nn.Module):
    """Linear layers whose weights the forward uses itself (``F.linear``): no layer is called as a
    module, so surgery reaches none of its products."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_channels * 64, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.nn.functional.linear(x.flatten(1), self.hidden.weight, self.hidden.bias).relu()
        return torch.nn.functional.linear(x, self.head.weight, self.head.bias)


class OwnProductNet(nn.Module):
    """A ``hidden`` layer, then a product of its own: ``F.linear`` with a raw Parameter ``head_weight``
    (``wide`` times the classes' outputs), which no layer rule reaches."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 4, wide: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_channels * 64, width)
        self.head_weight = nn.Parameter(torch.randn(num_classes * wide, width) * 0.1)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        scores = torch.nn.functional.linear(self.hidden(x.flatten(1)).relu(), self.head_weight)
        return scores.view(len(x), self.num_classes, -1).mean(-1)


@dataclass
class ClassifierOutput:
    """What a transformers classifier returns (``SequenceClassifierOutput``): loss, logits, hidden states."""

    logits: Tensor
    loss: Tensor | None = None


class OutputNet(SmallConvNet):
    """:class:`SmallConvNet` returning its logits as ``returns`` says: ``dataclass`` (a transformers-style
    output), ``dict``, ``tuple`` (``(logits, features)``) or ``str`` (no logits: an error)."""

    def __init__(self, in_channels: int, num_classes: int, returns: str = "dataclass") -> None:
        super().__init__(in_channels, num_classes)
        self.returns = returns

    def forward(self, x: Tensor) -> Any:
        logits = super().forward(x)
        return {"dataclass": lambda: ClassifierOutput(logits), "dict": lambda: {"logits": logits},
                "tuple": lambda: (logits, x), "str": lambda: "logits"}[self.returns]()


class HFConv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as it is written (GPT-2's layers): x @ W + b, W stored (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


HFConv1D.__module__, HFConv1D.__qualname__ = "transformers.pytorch_utils", "Conv1D"  # recognised by name, no import
