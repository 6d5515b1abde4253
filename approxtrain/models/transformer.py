"""A small causal Transformer language model for PTB (not in the paper): ``model=transformer``.

Built from ``torch.nn.TransformerEncoder`` with a causal mask, so its attention is
``nn.MultiheadAttention``, whose products surgery reaches through
:class:`~approxtrain.attention.ProjectedMultiheadAttention` (``transformer.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import DROPOUT, POSITIVE_INT, register_model


def sinusoids(length: int, width: int, device: torch.device) -> Tensor:
    """``(length, width)`` sinusoidal position encodings (Vaswani et al. 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / width))
    encoding = torch.zeros(length, width, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return encoding


class TransformerLanguageModel(nn.Module):
    """``encoder`` (embedding) + sinusoidal positions -> dropout -> ``transformer`` (causal,
    pre-norm ``nn.TransformerEncoder``) -> ``norm`` -> ``decoder``.

    Input: ``(B, T)`` int64 token ids. Output: ``(B, T, vocab_size)`` logits; position t sees tokens 0..t.
    """

    def __init__(self, vocab_size: int, hidden: int = 256, layers: int = 2, heads: int = 4, feedforward: int = 1024,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.heads={heads} does not divide model.hidden={hidden}; allowed: a divisor of model.hidden")
        self.hidden = hidden
        self.encoder = nn.Embedding(vocab_size, hidden)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, feedforward, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, input: Tensor) -> Tensor:
        length = input.shape[1]
        x = self.encoder(input) * math.sqrt(self.hidden) + sinusoids(length, self.hidden, input.device)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input.device)
        x = self.transformer(self.dropout(x), mask=causal, is_causal=True)  # (B, T, hidden)
        return self.decoder(self.norm(x))  # (B, T, vocab)


@register_model(
    "transformer", kind="text",
    checks={"hidden": POSITIVE_INT, "layers": POSITIVE_INT, "heads": POSITIVE_INT, "feedforward": POSITIVE_INT, "dropout": DROPOUT},
)
def transformer(info: DatasetInfo, *, hidden: int = 256, layers: int = 2, heads: int = 4, feedforward: int = 1024,
                dropout: float = 0.1) -> TransformerLanguageModel:
    """A 2-layer, 256-wide, 4-head causal Transformer LM over the dataset's vocabulary."""
    return TransformerLanguageModel(info.vocab_size, hidden, layers, heads, feedforward, dropout)
