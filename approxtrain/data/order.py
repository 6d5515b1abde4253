"""Training data order that depends only on the seed and the epoch.

A ``DataLoader`` with ``shuffle=True`` draws its permutation, and its workers' seeds,
from one generator in an order that depends on ``num_workers`` and on whether the
workers persist across epochs: the same seed then gives different runs, and a resumed
run differs from an uninterrupted one. Here the permutation of epoch ``e`` comes from
``(seed, e)`` alone (:class:`EpochShuffle`), and each item's random augmentation from
``(seed, e, index)`` (:class:`SeededItems`), in whichever process loads it. An epoch can
start at any batch (:meth:`ShuffledLoader.set_epoch`), so a run stopped mid-epoch
continues with exactly the batches it had left.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MIX = 1_000_003  # spreads (seed, epoch, index) over distinct generator seeds


def derived_seed(*key: int) -> int:
    """One generator seed per key tuple (``(seed, epoch)``, ``(seed, epoch, index)``, ...), stable across processes."""
    seed = 0
    for part in key:
        seed = (seed * _MIX + part) % (2**63 - 1)
    return seed


class EpochShuffle(Sampler[tuple[int, int]]):
    """A permutation of ``range(num_samples)`` per epoch, from ``(seed, epoch)``; yields ``(epoch, index)``
    pairs (so an item can seed its augmentation by them), starting at position ``start``.

    With ``world_size`` ranks (``DistributedSampler``'s split), rank ``r`` takes positions
    ``r, r + world_size, ...`` of the permutation, padded by its head to a multiple of
    ``world_size``: every rank has the same number of items, and the ranks' batches ``i``
    together are the one-process batch ``i`` of ``world_size`` times the size."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch)))
        if self.world_size > 1:
            order = order.repeat(-(-len(self) * self.world_size // self.num_samples))[: len(self) * self.world_size]
            order = order[self.rank :: self.world_size]
        return ((self.epoch, index) for index in order[self.start :].tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class SeededItems(Dataset):
    """``dataset[index]`` for an ``(epoch, index)`` key, with torch's RNG seeded by ``(seed, epoch, index)``
    while the item is made (random crops and flips), and left as it was afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: augmentations run on the CPU
            torch.default_generator.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the training process, which stops at a step
    boundary and then shuts them down (a worker killed by Ctrl-C would fail the batch in flight)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How loader workers are started: the process's own start method (None: torch's default), unless
    a launcher forced one of its own -- joblib runs each job in a loky worker whose start method is
    ``loky``: its ``Popen`` takes only loky's own processes (torch's worker ``Process`` has no ``env``)
    and a ``spawn``/``forkserver`` child cannot find a context of that name. ``fork`` starts them there."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method is None or method in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def worker_options(num_workers: int) -> dict[str, Any]:
    """A ``DataLoader``'s worker arguments: ``num_workers`` processes, kept across epochs, that leave stop
    signals to the training process, started by :func:`worker_context`."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "persistent_workers": True, "worker_init_fn": ignore_stop_signals,
            "multiprocessing_context": worker_context()}


class ShuffledLoader(DataLoader):
    """The training loader: :class:`EpochShuffle` order over :class:`SeededItems` (``shard``: this
    rank's share, ``(rank, world_size)``); ``len()`` is a whole epoch's batches. Call :meth:`set_epoch` before iterating an epoch."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, num_workers: int, pin_memory: bool,
                 shard: tuple[int, int] = (0, 1)) -> None:
        super().__init__(SeededItems(dataset, seed), batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed, *shard),
                         drop_last=False, pin_memory=pin_memory, **worker_options(num_workers))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` (1-based) from its batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)


def shutdown_workers(loader: object) -> None:
    """Stop a loader's persistent worker processes now (rather than when the process exits)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None  # type: ignore[attr-defined]
