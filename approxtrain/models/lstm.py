"""LSTM language model for PTB: Zaremba et al. (2014) "medium" (Adelman & Silberstein 2018).

Two cells with identical math: ``"cudnn"`` (one ``nn.LSTM``) and ``"unrolled"``, built
from plain ``nn.Linear`` gate layers so that surgery can sample the gate products
(the paper's ``W1``); ``decoder`` is the paper's ``W2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import DROPOUT, POSITIVE_INT, one_of, register_model

CELLS = ("cudnn", "unrolled")
State = tuple[Tensor, Tensor]


class LSTMLayer(nn.Module):
    """One LSTM layer unrolled over time; ``gates`` is applied to ``[x_t, h_{t-1}]`` every step.

    ``i, f, g, o = split(gates([x_t, h_{t-1}]))`` (nn.LSTM's order),
    ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)``, ``h_t = sigmoid(o) tanh(c_t)``.

    Input: ``(B, T, input_size)`` and state ``(h, c)``, each ``(B, hidden_size)``.
    Output: ``(B, T, hidden_size)`` and the final state.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        h, c = state
        outputs = []
        for x_t in x.unbind(1):
            i, f, g, o = self.gates(torch.cat([x_t, h], dim=1)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}"


class UnrolledLSTM(nn.ModuleList):
    """Drop-in for ``nn.LSTM(..., batch_first=True)``: layers ``0, 1, ...`` are :class:`LSTMLayer`.

    Input: ``(B, T, input_size)`` and state ``(h_0, c_0)``, each ``(layers, B, hidden_size)``.
    Output: ``(B, T, hidden_size)`` and ``(h_n, c_n)``. Dropout ``dropout`` between layers
    (training only), as nn.LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__(
            LSTMLayer(input_size if layer == 0 else hidden_size, hidden_size) for layer in range(num_layers)
        )
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        h_0, c_0 = state
        h_n, c_n = [], []
        for index, layer in enumerate(self):
            if index > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, (h, c) = layer(x, (h_0[index], c_0[index]))
            h_n.append(h)
            c_n.append(c)
        return x, (torch.stack(h_n), torch.stack(c_n))


class LSTMLanguageModel(nn.Module):
    """``encoder`` (embedding) -> dropout -> ``rnn`` (stacked LSTM) -> dropout -> ``decoder``.

    Input: ``(B, T)`` int64 token ids. Output: ``(B, T, vocab_size)`` logits.

    The hidden state is carried across calls (truncated backpropagation through time): it
    is detached at the start of each forward and restarts at zero on :meth:`reset_state`
    or when the batch size or device changes. Call :meth:`reset_state` at the start of
    each epoch and before evaluation.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 650,
        layers: int = 2,
        dropout: float = 0.5,
        cell: str = "cudnn",
        init_scale: float = 0.05,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown lstm cell {cell!r}; allowed: {', '.join(CELLS)}")
        self.cell, self.init_scale = cell, init_scale
        self.encoder = nn.Embedding(vocab_size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.rnn: nn.LSTM | UnrolledLSTM
        if cell == "cudnn":
            self.rnn = nn.LSTM(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        else:
            self.rnn = UnrolledLSTM(hidden, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab_size)
        self.hidden, self.layers = hidden, layers
        self.state: State | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter uniform in ``(-init_scale, init_scale)``."""
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -self.init_scale, self.init_scale)

    def reset_state(self) -> None:
        """Forget the carried hidden state: the next forward starts from zeros."""
        self.state = None

    def _initial_state(self, batch_size: int) -> State:
        weight = self.encoder.weight
        state = self.state
        if state is None or state[0].shape[1] != batch_size or state[0].device != weight.device:
            zeros = weight.new_zeros(self.layers, batch_size, self.hidden)
            return zeros, zeros.clone()
        return state[0].detach(), state[1].detach()

    def forward(self, input: Tensor) -> Tensor:
        x = self.dropout(self.encoder(input))  # (B, T, hidden)
        x, (h, c) = self.rnn(x, self._initial_state(input.shape[0]))
        self.state = (h.detach(), c.detach())
        return self.decoder(self.dropout(x))  # (B, T, vocab)


@register_model(
    "lstm", kind="text", checks={"hidden": POSITIVE_INT, "layers": POSITIVE_INT, "dropout": DROPOUT, "cell": one_of(*CELLS)}
)
def lstm_medium(
    info: DatasetInfo, *, hidden: int = 650, layers: int = 2, dropout: float = 0.5, cell: str = "cudnn"
) -> LSTMLanguageModel:
    """Zaremba et al.'s medium PTB model: 2 x 650 LSTM, dropout 0.5, init uniform(-0.05, 0.05)."""
    return LSTMLanguageModel(info.vocab_size, hidden=hidden, layers=layers, dropout=dropout, cell=cell)
