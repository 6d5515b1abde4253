"""Datasets and loaders: ``build_loaders(dataset_config, ...) -> Loaders(train, test, info, val)``.

Each loader is re-iterable, has ``len()`` (batches per epoch) and yields
``(input, target)`` tensor pairs: images ``(B, C, H, W)`` float32 with ``(B,)`` int64
labels, text ``(B, T)`` int64 token ids with ``(B, T)`` int64 next tokens. ``val`` is the
validation loader (``None`` without validation data): image datasets hold out
``dataset.val_fraction`` of their training set (the same items whatever the run's seed, read
without augmentation); PTB validates on ``ptb.valid.txt`` unless it trains on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from approxtrain.data.info import DATASETS, OFFLINE_CHOICES, DatasetInfo, DatasetNotFound

if TYPE_CHECKING:
    from approxtrain.spec import DatasetSpec

__all__ = [
    "DATASETS",
    "OFFLINE_CHOICES",
    "DatasetInfo",
    "DatasetNotFound",
    "build_loaders",
]


def dataset_builder(name: str) -> Callable[..., tuple]:
    """The function that builds dataset ``name`` from its own fields (``DATASET_FIELDS[name]``; image datasets:
    but ``val_fraction``, which :func:`build_loaders` applies) and :func:`build_loaders`' keyword-only context.
    Image builders return (train set, test set, info, train set read as test). The builders' modules import
    torch, so they are imported when data is loaded, not with this package."""
    from approxtrain.data import images, synthetic, text

    builders = {"mnist": images.mnist, "cifar10": partial(images.cifar, "cifar10"), "cifar100": partial(images.cifar, "cifar100"),
                "imagenet": images.imagenet, "digits": images.digits, "ptb": text.ptb, "synthetic": synthetic.synthetic}
    return builders[name]


class Loaders(NamedTuple):
    """What :func:`build_loaders` returns."""

    train: Iterable
    test: Iterable
    info: DatasetInfo
    val: Iterable | None = None  # no validation data: None


def build_loaders(
    dataset: DatasetSpec | Mapping[str, Any], *, num_workers: int, seed: int, pin_memory: bool, shard: tuple[int, int] = (0, 1)
) -> Loaders:
    """Training, test (and validation) loaders for a ``dataset`` config (a :class:`DatasetSpec`, or the resolved
    mapping it is made from) and its :class:`DatasetInfo`.

    ``dataset`` holds ``name``, ``batch_size``, ``eval_batch_size`` and exactly the fields
    of that dataset (``configs/dataset/<name>.yaml``): ``root``/``download`` (where the data
    lives; whether a missing torchvision dataset may be fetched), ``image_size`` (image
    datasets: H = W, null = native; ``val_fraction``: the share of the training set held out for
    validation, 0 for none), ``seq_len``/``train_split`` (ptb: windows and the file
    trained on, ``train`` or ``valid``; evaluation is always on ``test``), ``like``/
    ``num_samples`` (synthetic: whose shapes, how many training samples). ``seed`` seeds the
    training shuffle (and synthetic data). ``shard = (rank, world_size)``: this rank's share of the
    training data, ``batch_size`` per rank (images: every ``world_size``-th item of the epoch's
    order; text: ``batch_size`` of the ``world_size * batch_size`` rows of the token stream).

    Raises :class:`~approxtrain.checks.ConfigError` (a ``ValueError``) for an unknown name, field or bad
    value and :class:`DatasetNotFound` when the data is missing and cannot be downloaded (one-line messages).
    """
    from approxtrain.data import images
    from approxtrain.spec import DatasetSpec, dataset_spec

    spec = dataset if isinstance(dataset, DatasetSpec) else dataset_spec(dataset)
    name, batch_size, eval_batch_size, fields = spec.name, spec.batch_size, spec.eval_batch_size, dict(spec.fields)
    build = dataset_builder(name)

    rank, world_size = shard
    text_batches = dict(batch_size=batch_size * world_size, eval_batch_size=eval_batch_size)  # token streams come batched
    if name == "ptb":
        train_set, test_set, info, val_set = build(**fields, **text_batches)
        return Loaders(train_set.shard(rank, world_size), test_set, info, val_set)
    val_set = None
    if name == "synthetic":
        train_set, test_set, info = build(**fields, seed=seed, **text_batches)
        if info.kind == "text":
            return Loaders(train_set.shard(rank, world_size), test_set, info)
    else:
        val_fraction = fields.pop("val_fraction")
        train_set, test_set, info, train_as_test = build(**fields)
        train_set, val_set = images.split_validation(train_set, train_as_test, val_fraction)
    train_loader, test_loader = images.make_loaders(
        train_set, test_set, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        pin_memory=pin_memory, shard=shard
    )
    val_loader = None if val_set is None else images.eval_loader(
        val_set, eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)
    return Loaders(train_loader, test_loader, info, val_loader)
