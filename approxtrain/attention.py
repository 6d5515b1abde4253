"""Multi-head attention whose four weight products are ``nn.Linear`` submodule calls.

``nn.MultiheadAttention`` computes its input projection with ``F.linear`` on the raw
``in_proj_weight`` (and its output projection from ``out_proj.weight``, not by calling
``out_proj``), so surgery, which swaps modules, cannot reach them.
:class:`ProjectedMultiheadAttention` computes the same function with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` called as modules, so each is a Linear layer the layer rules can
sample (``*.self_attn.q_proj``). The attention products themselves (``Q Kᵀ`` and the
weights times ``V``) multiply activations by activations: they stay exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why ``attention`` cannot become a :class:`ProjectedMultiheadAttention`, or None when it can."""
    if attention.bias_k is not None:
        return "add_bias_kv=True"
    if attention.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: may not attend) as an additive float mask; a float mask as is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _save_as_multihead_attention(module: ProjectedMultiheadAttention, state_dict: dict, prefix: str, *_) -> None:
    """``state_dict`` keys as ``nn.MultiheadAttention``'s: ``in_proj_weight`` (or ``q_proj_weight``, ...), ``in_proj_bias``."""
    weights = [state_dict.pop(f"{prefix}{name}.weight").detach() for name in PROJECTIONS]
    if module._qkv_same_embed_dim:
        state_dict[f"{prefix}in_proj_weight"] = torch.cat(weights)
    else:
        state_dict.update({f"{prefix}{name}_weight": weight for name, weight in zip(PROJECTIONS, weights)})
    if module.q_proj.bias is not None:
        state_dict[f"{prefix}in_proj_bias"] = torch.cat([state_dict.pop(f"{prefix}{name}.bias").detach() for name in PROJECTIONS])


def _load_as_projections(module: ProjectedMultiheadAttention, state_dict: dict, prefix: str, *_) -> None:
    """``nn.MultiheadAttention``'s keys (as :func:`_save_as_multihead_attention` writes them) split into the projections'."""
    for fused, suffix in ((f"{prefix}in_proj_weight", "weight"), (f"{prefix}in_proj_bias", "bias")):
        if fused in state_dict:
            state_dict.update({f"{prefix}{name}.{suffix}": part for name, part in zip(PROJECTIONS, state_dict.pop(fused).chunk(3))})
    for name in PROJECTIONS:
        if f"{prefix}{name}_weight" in state_dict:
            state_dict[f"{prefix}{name}.weight"] = state_dict.pop(f"{prefix}{name}_weight")


class ProjectedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s function with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
    as ``nn.Linear`` modules; made by :meth:`from_multihead_attention`.

    Shapes and arguments as ``nn.MultiheadAttention.forward``: query ``(L, N, E)`` (``(N, L, E)``
    with ``batch_first``, ``(L, E)`` unbatched), key/value ``(S, N, kdim/vdim)``;
    ``key_padding_mask`` ``(N, S)``, ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``
    (boolean, True = may not attend, or additive float). Returns the output and, with
    ``need_weights``, the attention weights (averaged over heads with ``average_attn_weights``).
    ``attention(x) = out_proj(softmax(q_proj(x) k_proj(x)ᵀ / sqrt(head_dim) + mask) v_proj(x))`` per head.
    Its ``state_dict`` has ``nn.MultiheadAttention``'s keys: a checkpoint loads into either.
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                 out_proj: nn.Linear, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        # nn.TransformerEncoderLayer's inference fast path reads this, in_proj_weight/in_proj_bias and merge_masks
        self._qkv_same_embed_dim = q_proj.in_features == k_proj.in_features == v_proj.in_features == embed_dim
        self.register_state_dict_post_hook(_save_as_multihead_attention)
        self.register_load_state_dict_pre_hook(_load_as_projections)

    merge_masks = nn.MultiheadAttention.merge_masks

    @classmethod
    def from_multihead_attention(cls, attention: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        """The same attention, its input projection split into three Linear layers (new Parameters,
        equal values: build the optimizer afterwards); ``out_proj`` is kept (same Parameters)."""
        reason = unsupported(attention)
        if reason is not None:
            raise ValueError(f"nn.MultiheadAttention with {reason} is not supported")
        embed_dim = attention.embed_dim
        if attention._qkv_same_embed_dim:
            weights = attention.in_proj_weight.chunk(3)
        else:
            weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
        projections = []
        for weight, bias in zip(weights, biases):
            linear = nn.Linear(weight.shape[1], embed_dim, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.requires_grad_(weight.requires_grad)
            projections.append(linear)
        projected = cls(embed_dim, attention.num_heads, *projections, attention.out_proj, attention.dropout, attention.batch_first)
        return projected.train(attention.training)

    @property
    def in_proj_weight(self) -> Tensor | None:
        """The fused ``(3 E, E)`` input projection weight (``nn.MultiheadAttention``'s), or None for separate kdim/vdim."""
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([getattr(self, name).weight for name in PROJECTIONS])

    @property
    def in_proj_bias(self) -> Tensor | None:
        if self.q_proj.bias is None:
            return None
        return torch.cat([getattr(self, name).bias for name in PROJECTIONS])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        heads = (batch, -1, self.num_heads, self.head_dim)
        q = self.q_proj(query).view(heads).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(key).view(heads).transpose(1, 2)  # (N, H, S, D)
        v = self.v_proj(value).view(heads).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, batch, target, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is None and is_causal:
                mask = _additive(torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1), q.dtype)
            weights = F.dropout(torch.softmax(scores if mask is None else scores + mask, dim=-1), dropout, self.training)
            output = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None)
        output = self.out_proj(output.transpose(1, 2).reshape(batch, target, self.embed_dim))
        if not batched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        return (output if self.batch_first else output.transpose(0, 1)), weights

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, target: int, source: int,
              dtype: torch.dtype) -> Tensor | None:
        """``attn_mask`` and ``key_padding_mask`` as one additive mask broadcastable to ``(N, H, L, S)``."""
        mask = _additive(attn_mask, dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(batch, self.num_heads, target, source)
        padding = _additive(key_padding_mask, dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
