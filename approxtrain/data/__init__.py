"""Datasets and loaders: ``build_loaders(dataset_config, ...) -> Loaders(train, test, info, val)``.

Each loader is re-iterable, has ``len()`` (batches per epoch) and yields
``(input, target)`` tensor pairs: images ``(B, C, H, W)`` float32 with ``(B,)`` int64
labels, text ``(B, T)`` int64 token ids with ``(B, T)`` int64 next tokens. ``val`` is the
validation loader (``None`` without validation data): image datasets hold out
``dataset.val_fraction`` of their training set (the same items whatever the run's seed, read
without augmentation); PTB validates on ``ptb.valid.txt`` unless it trains on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, NamedTuple

from approxtrain.checks import POSITIVE_INT, or_null
from approxtrain.data.info import IMAGE_SHAPES, OFFLINE_CHOICES, DatasetInfo, DatasetNotFound

__all__ = [
    "DATASETS",
    "OFFLINE_CHOICES",
    "DatasetInfo",
    "DatasetNotFound",
    "build_loaders",
]

# The image datasets are the ones whose shapes are known; ptb is text; synthetic mimics any of them.
DATASETS = (*IMAGE_SHAPES, "ptb", "synthetic")


def _image_set(name: str) -> Callable[..., tuple[Any, Any, DatasetInfo, Any]]:
    """The builder of image dataset ``name``: (train set, test set, info, train set read as test) from its
    config fields. The loaders' modules import torch, so they are imported when data is loaded, not with
    this package."""
    from approxtrain.data import images

    builders = {"mnist": images.mnist, "cifar10": partial(images.cifar, "cifar10"),
                "cifar100": partial(images.cifar, "cifar100"), "imagenet": images.imagenet, "digits": images.digits}
    return builders[name]


class Loaders(NamedTuple):
    """What :func:`build_loaders` returns."""

    train: Iterable
    test: Iterable
    info: DatasetInfo
    val: Iterable | None = None  # no validation data: None


def _val_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"dataset.val_fraction={value!r} is invalid; allowed: a number in [0, 1) (0: no validation split)")
    return float(value)
_LOADER_KEYS = ("name", "batch_size", "eval_batch_size")


def _from_fields(source: Callable, name: str, fields: Mapping[str, Any], **context: Any) -> Any:
    """``source(**fields, **context)``, where ``fields`` must be exactly ``source``'s other parameters."""
    expected = [parameter for parameter in inspect.signature(source).parameters if parameter not in context]
    unknown = sorted(set(fields) - set(expected))
    missing = [field for field in expected if field not in fields]
    if unknown or missing:
        problem = f"dataset.{unknown[0]} is not a field of {name}" if unknown else f"dataset.{missing[0]} is missing for {name}"
        raise ValueError(f"{problem}; its fields: {', '.join([*_LOADER_KEYS, *expected])}")
    return source(**fields, **context)


def build_loaders(
    dataset: Mapping[str, Any], *, num_workers: int, seed: int, pin_memory: bool, shard: tuple[int, int] = (0, 1)
) -> Loaders:
    """Training, test (and validation) loaders for a resolved ``dataset`` config and its :class:`DatasetInfo`.

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

    Raises ``ValueError`` for an unknown name, field or bad value and :class:`DatasetNotFound`
    when the data is missing and cannot be downloaded (one-line messages).
    """
    fields = dict(dataset)
    name = fields.pop("name", None)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    batch_size, eval_batch_size = fields.pop("batch_size", None), fields.pop("eval_batch_size", None)
    POSITIVE_INT("dataset.batch_size", batch_size)
    POSITIVE_INT("dataset.eval_batch_size", eval_batch_size)
    or_null(POSITIVE_INT, "null or an integer >= 1")("dataset.image_size", fields.get("image_size"))

    from approxtrain.data import images, synthetic, text

    rank, world_size = shard
    text_batches = dict(batch_size=batch_size * world_size, eval_batch_size=eval_batch_size)  # token streams come batched
    if name == "ptb":
        train_set, test_set, info, val_set = _from_fields(text.ptb, name, fields, **text_batches)
        return Loaders(train_set.shard(rank, world_size), test_set, info, val_set)
    val_set = None
    if name == "synthetic":
        train_set, test_set, info = _from_fields(synthetic.synthetic, name, fields, seed=seed, **text_batches)
        if info.kind == "text":
            return Loaders(train_set.shard(rank, world_size), test_set, info)
    else:
        val_fraction = _val_fraction(fields.pop("val_fraction", 0.0))
        train_set, test_set, info, train_as_test = _from_fields(_image_set(name), name, fields)
        train_set, val_set = images.split_validation(train_set, train_as_test, val_fraction)
    train_loader, test_loader = images.make_loaders(
        train_set, test_set, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        pin_memory=pin_memory, shard=shard
    )
    val_loader = None if val_set is None else images.eval_loader(
        val_set, eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)
    return Loaders(train_loader, test_loader, info, val_loader)
