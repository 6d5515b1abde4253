"""The fields of a layer's sampling and their defaults, as a plain dataclass without torch.

:class:`~approxtrain.sampling.SamplingConfig` is this dataclass with its checks and the
``k`` arithmetic; it documents each field. The CLI's config store reads the defaults here
(:func:`sampler_defaults`), so composing a config (``approxtrain --help``, ``--cfg``, shell
completion) imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# SamplingConfig fields that are not the sampler group's: the policy is the group's ``name``,
# the ratio the config's top-level ``ratio``
NOT_SAMPLER_GROUP_FIELDS = ("policy", "ratio")


@dataclass(frozen=True)
class SamplingFields:
    """The fields of :class:`~approxtrain.sampling.SamplingConfig`, with their defaults."""

    policy: str = "topk"
    ratio: float = 1.0
    min_k: int = 1
    replacement: bool = False
    scale: bool = True
    bwd_ratio: float = 1.0
    bwd_min_k: int = 1
    wu_ratio: float = 1.0
    wu_min_k: int = 1
    align_k: int = 1
    fixed_k: int | None = None
    k_rounding: str = "nearest"
    mode: str = "forward"
    reselect_every: int = 1


def sampler_defaults() -> dict[str, Any]:
    """The sampler group's fields and their defaults: :class:`SamplingFields`'s, less ``policy``
    (the sampler's ``name``) and ``ratio`` (the top-level ``ratio``)."""
    return {field.name: field.default for field in fields(SamplingFields) if field.name not in NOT_SAMPLER_GROUP_FIELDS}
