"""Datasets and loaders: ``build_loaders(name, ...) -> (train_loader, test_loader, info)``.

Each loader is re-iterable, has ``len()`` (batches per epoch) and yields
``(input, target)`` tensor pairs: images ``(B, C, H, W)`` float32 with ``(B,)`` int64
labels, text ``(B, T)`` int64 token ids with ``(B, T)`` int64 next tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from approxtrain.data import images, synthetic, text
from approxtrain.data.info import OFFLINE_CHOICES, DatasetInfo, DatasetNotFound

__all__ = [
    "DATASETS",
    "OFFLINE_CHOICES",
    "PAPER_DATASET",
    "DatasetInfo",
    "DatasetNotFound",
    "build_loaders",
]

DATASETS = ("mnist", "cifar10", "cifar100", "ptb", "imagenet", "digits", "synthetic")
# The dataset each model is trained on in Adelman & Silberstein (2018).
PAPER_DATASET = {"mlp": "mnist", "cnn": "mnist", "lstm": "ptb", "wrn": "cifar100", "resnet50": "imagenet"}


def build_loaders(
    name,
    *,
    root: str = "data/",
    download: bool = True,
    batch_size: int = 0,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    num_samples: int = 512,
    like: str = "mnist",
    image_size: int | None = None,
    seq_len: int = 35,
    train_split: str = "train",
    pin_memory: bool = False,
) -> tuple[Iterable, Iterable, DatasetInfo]:
    """Training and test loaders for dataset ``name`` and its :class:`DatasetInfo`.

    ``root``/``download``: where torchvision datasets and PTB live, and whether a
    missing torchvision dataset may be fetched. ``seed`` seeds the training shuffle
    (and synthetic data). ``num_samples``/``like``: size and shapes of ``synthetic``
    (test set: a quarter, at least one batch). ``image_size`` overrides H = W (resizing
    real images). ``seq_len``/``train_split``: text windows and the PTB file trained on
    (``train`` or ``valid``; evaluation is always on ``test``).

    Raises ``ValueError`` for an unknown name or bad argument and :class:`DatasetNotFound`
    when the data is missing and cannot be downloaded (one-line messages).
    """
    if not isinstance(name, str):  # TEMP shim until the registry lands
        keys = ("root", "download", "eval_batch_size", "num_samples", "like", "image_size", "seq_len", "train_split")
        node = name
        name, batch_size = node["name"], node["batch_size"]
        return build_loaders(name, batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                             **{key: node[key] for key in keys if key in node})
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"dataset.image_size must be >= 1 or null, got {image_size}")
    eval_batch_size = eval_batch_size or batch_size

    if name == "ptb":
        return text.ptb(
            root, batch_size=batch_size, eval_batch_size=eval_batch_size, seq_len=seq_len, train_split=train_split
        )
    if train_split != "train":
        raise ValueError(f"dataset.train_split={train_split!r} is only for ptb; {name} trains on its train split")

    if name == "synthetic":
        if like not in synthetic.LIKES:
            raise ValueError(f"unknown dataset.like={like!r} for synthetic; allowed: {', '.join(synthetic.LIKES)}")
        if num_samples < 1:
            raise ValueError(f"dataset.num_samples must be >= 1, got {num_samples}")
        num_test = max(num_samples // 4, eval_batch_size)
        if like in synthetic.TEXT_VOCABULARIES:
            return synthetic.synthetic_text(
                like,
                num_samples=num_samples,
                num_test=num_test,
                seed=seed,
                batch_size=batch_size,
                eval_batch_size=eval_batch_size,
                seq_len=seq_len,
            )
        train_set, test_set, info = synthetic.synthetic_images(
            like, num_samples=num_samples, num_test=num_test, seed=seed, image_size=image_size
        )
    elif name == "mnist":
        train_set, test_set, info = images.mnist(root, download, image_size)
    elif name in ("cifar10", "cifar100"):
        train_set, test_set, info = images.cifar(name, root, download, image_size)
    elif name == "imagenet":
        train_set, test_set, info = images.imagenet(root, image_size)
    else:  # digits
        train_set, test_set, info = images.digits(image_size)

    train_loader, test_loader = images.make_loaders(
        train_set,
        test_set,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=num_workers,
        seed=seed,
        pin_memory=pin_memory,
    )
    return train_loader, test_loader, info
