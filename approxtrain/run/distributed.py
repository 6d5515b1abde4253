"""What the ranks of a data-parallel run do together on ``torch.distributed``, step by step.

Starting the ranks and sending them their jobs is :mod:`approxtrain.run.launch`'s; a
:class:`Distributed` is this rank's place in one run.

Per step (:class:`Distributed`): with ``selection=global`` each approximated layer's input
norms are all-reduced before its pairs are selected (every rank keeps the same pairs; the
run trains as one process on the global batch); ``weights`` scores by the weights alone
(no communication in forward); ``local`` selects on each rank's own batch. Gradients are
all-reduced inside DDP's buckets by :class:`GradientAllReduce`, which with
``sampled_allreduce`` sends only the kept slices of the approximated weights' gradients
and counts the bytes sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from approxtrain.functional import PairScoring
from approxtrain.modules import SampledLayer
from approxtrain.run.selection_modes import get_selection_mode
from approxtrain.spec import DistributedSpec


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: ``nccl`` for CUDA, ``gloo`` otherwise."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


# ---------------------------------------------------------------------------------------------- a run's ranks


@dataclass
class Distributed:
    """This rank in a run: reductions over the ranks, the layers' pair scoring and the DDP wrapper.

    ``world_size`` 1 is a one-process run (every reduction is the identity); ``selection=weights``
    still scores pairs by the weights alone there."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # the training process group
    selection: str = "global"
    allreduce: str = "full"
    hook: GradientAllReduce | None = None
    device: torch.device = torch.device("cpu")  # where the reductions' tensors live (set by :meth:`wrap`)

    @classmethod
    def of(cls, settings: DistributedSpec, rank: int = 0, world_size: int = 1, local_rank: int = 0, group: Any = None) -> Distributed:
        """Rank ``rank`` of ``world_size`` in the training ``group``, with the run's ``trainer.distributed`` settings."""
        sampled = settings.sampled_allreduce
        sampled = get_selection_mode(settings.selection).same_on_every_rank if sampled == "auto" else sampled
        return cls(rank, world_size, local_rank, group, settings.selection, "sampled" if sampled else "full")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in place)."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the ranks (in place)."""
        return self.sum(t).div_(self.world_size) if self.world_size > 1 else t

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a stop request: every rank stops at the same step)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def _input_norms(self, norms: Tensor) -> Tensor:
        """The norms of the global batch's input slices from this rank's: ``sqrt(sum over ranks of norm^2)``."""
        squares = norms.float().square()
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt_().to(norms.dtype)

    def attach(self, model: nn.Module) -> dict[nn.Parameter, SlicedGradient]:
        """Give every approximated layer of ``model`` the :class:`PairScoring` its selection mode
        (:mod:`approxtrain.run.selection_modes`) says (none where the default -- local scores on
        one process -- holds: a layer's scoring is then left as it is); returns them by the Parameters
        whose gradient is zero outside the kept pairs (a parametrized weight's is not: none)."""
        mode = get_selection_mode(self.selection)
        sliced = {}
        for layer in model.modules():
            if isinstance(layer, SampledLayer):
                scoring = mode.scoring(self._input_norms, self.world_size)
                if scoring is not None:
                    layer.scoring = scoring
                    sliced.update({parameter: SlicedGradient(scoring, dim) for parameter, dim in layer.sliced_gradients().items()})
        return sliced

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DDP with :class:`GradientAllReduce` as its comm hook (one process: ``model``);
        sets the layers' pair scoring either way."""
        scorings = self.attach(model)
        self.device = device
        if self.world_size == 1:
            return model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  process_group=self.group)
        self.hook = GradientAllReduce(self.group, self.allreduce, scorings if self.allreduce == "sampled" else {})
        ddp.register_comm_hook(self.hook, _comm_hook)
        return ddp

    def communication(self) -> Communication:
        """Gradient bytes this rank sent since the start (zero on one process)."""
        return self.hook.sent if self.hook is not None else Communication()


# ---------------------------------------------------------------------------------------------- gradients


@dataclass
class Communication:
    """Gradient bytes one rank all-reduced: what DDP's full all-reduce would send and what was sent."""

    exact_bytes: int = 0
    actual_bytes: int = 0

    @property
    def reduction(self) -> float:
        """Share of the bytes saved, ``(exact - actual) / exact`` (as the compute reduction is said)."""
        return (self.exact_bytes - self.actual_bytes) / self.exact_bytes if self.exact_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"exact_bytes": self.exact_bytes, "actual_bytes": self.actual_bytes, "reduction": self.reduction}


def _comm_hook(state, bucket):  # (no annotations: DDP checks them against its own types)
    return state.reduce(bucket)


class SlicedGradient(NamedTuple):
    """A Parameter's gradient that is zero outside its layer's kept pairs: the layer's scoring
    (which records them) and the dim of the gradient they index."""

    scoring: PairScoring
    dim: int


@dataclass
class GradientAllReduce:
    """DDP comm-hook state: averages each bucket over the ranks, asynchronously (overlapped with the
    rest of backward), and counts the bytes.

    ``mode``: ``full`` (DDP's default all-reduce) or ``sampled``: the gradient of an approximated
    layer's weight is zero outside the input features / channels its forward kept (on every rank,
    when they keep the same ones), so only those slices (dim 1 of a Linear's weight, dim 0 of a
    transformers Conv1D's) are packed, all-reduced and unpacked; everything else goes in full.
    ``scorings`` maps such a weight to its :class:`SlicedGradient`, whose scoring's ``kept`` it reads and clears.
    """

    group: Any
    mode: str = "full"
    scorings: dict[nn.Parameter, SlicedGradient] = field(default_factory=dict)
    sent: Communication = field(default_factory=Communication)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "sampled"):
            raise ValueError(f"gradient all-reduce mode={self.mode!r} is invalid; allowed: full, sampled")
        for sliced in self.scorings.values():
            sliced.scoring.kept = []

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer = bucket.buffer()
        self.sent.exact_bytes += buffer.numel() * buffer.element_size()
        if self.mode == "full" or not any(parameter in self.scorings for parameter in bucket.parameters()):
            self.sent.actual_bytes += buffer.numel() * buffer.element_size()
            return default_hooks.allreduce_hook(self.group, bucket)
        return self._sampled(bucket)

    def _kept(self, parameter: Tensor) -> tuple[Tensor, int] | None:
        """The input features / channels ``parameter``'s gradient may be non-zero at, and the dim they
        index (None: all)."""
        sliced = self.scorings.get(parameter)  # type: ignore[call-overload]
        if sliced is None or not sliced.scoring.kept:
            return None
        found = sliced.scoring.kept
        kept = found[0] if len(found) == 1 else torch.cat(found).unique()
        sliced.scoring.kept = []
        return None if kept.numel() >= parameter.shape[sliced.dim] else (kept, sliced.dim)

    def _sampled(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer, parameters = bucket.buffer(), bucket.parameters()
        gradients = _bucket_views(buffer, parameters)
        keeps = [self._kept(parameter) for parameter in parameters]
        packed = torch.cat([(g if keep is None else g.index_select(keep[1], keep[0])).reshape(-1) for g, keep in zip(gradients, keeps)])
        packed.div_(dist.get_world_size(self.group))
        self.sent.actual_bytes += packed.numel() * packed.element_size()

        def unpack(future: torch.futures.Future) -> Tensor:
            reduced, offset = future.value()[0], 0
            for g, keep in zip(gradients, keeps):
                shape = list(g.shape)
                if keep is not None:
                    shape[keep[1]] = keep[0].numel()
                part = reduced[offset:offset + math.prod(shape)].view(shape)
                offset += part.numel()
                if keep is None:
                    g.copy_(part)
                else:
                    g.index_copy_(keep[1], keep[0], part)
            return buffer

        return dist.all_reduce(packed, group=self.group, async_op=True).get_future().then(unpack)


def _bucket_views(buffer: Tensor, parameters: list[Tensor]) -> list[Tensor]:
    """Each parameter's gradient as a view of the bucket's flat ``buffer``: laid out one after the
    other, each with its parameter's strides (as DDP's reducer lays them out)."""
    views, offset = [], buffer.storage_offset()
    for parameter in parameters:
        strides = parameter.stride() if _dense(parameter) else torch.empty(parameter.shape).stride()
        views.append(buffer.as_strided(parameter.shape, strides, offset))
        offset += parameter.numel()
    return views


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span exactly once, in some order of its dims."""
    span = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size > 1 and stride != span:
            return False
        span *= size
    return True
