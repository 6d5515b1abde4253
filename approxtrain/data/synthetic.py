"""Random data with the real shapes of a dataset, for offline shape, speed and memory checks.

Images are standard normal, labels uniform; a sample depends only on ``seed``, the split
and its index (generated on access, so even ImageNet-sized sets take no memory).
Text is a uniform random token stream over the dataset's vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from approxtrain.data.info import IMAGE_SHAPES, TEXT_VOCABULARIES, DatasetInfo
from approxtrain.data.text import TokenBatches

TRAIN, TEST = 0, 1


def _generator(seed: int, split: int, index: int = -1) -> torch.Generator:
    """A generator seeded by ``(seed, split, index)`` (stable across processes)."""
    return torch.Generator().manual_seed(hash((seed, split, index)) & 0x7FFF_FFFF_FFFF_FFFF)


class SyntheticImages(Dataset):
    """``num_samples`` random images ``(C, size, size)`` float32 with int64 labels in ``[0, classes)``."""

    def __init__(self, num_samples: int, channels: int, size: int, num_classes: int, *, seed: int, split: int) -> None:
        self.shape = (channels, size, size)
        self.seed, self.split = seed, split
        self.targets = torch.randint(num_classes, (num_samples,), generator=_generator(seed, split))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = torch.randn(self.shape, generator=_generator(self.seed, self.split, index))
        return image, self.targets[index]


def like_info(like: str, image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of synthetic data shaped like dataset ``like`` (``image_size``: H = W, None: ``like``'s)."""
    if like in TEXT_VOCABULARIES:
        return DatasetInfo("synthetic", "text", vocab_size=TEXT_VOCABULARIES[like], metric="perplexity")
    channels, size, num_classes = IMAGE_SHAPES[like]
    size = image_size or size
    return DatasetInfo("synthetic", "image", in_channels=channels, image_size=(size, size), num_classes=num_classes)


def synthetic(
    like: str, num_samples: int, image_size: int | None, seq_len: int, *, seed: int, batch_size: int, eval_batch_size: int
) -> tuple[SyntheticImages | TokenBatches, SyntheticImages | TokenBatches, DatasetInfo]:
    """Train and test data shaped like dataset ``like``: image datasets (``image_size``
    overrides H = W) or batched text streams of ``seq_len``-token windows. ``num_samples``
    training samples; the test set has a quarter of that, at least one batch. (The fields are checked
    where the run spec is made: :func:`approxtrain.spec.dataset_spec`.)"""
    num_test = max(num_samples // 4, eval_batch_size)
    if like in TEXT_VOCABULARIES:
        return synthetic_text(
            like, num_samples=num_samples, num_test=num_test, seed=seed,
            batch_size=batch_size, eval_batch_size=eval_batch_size, seq_len=seq_len,
        )
    return synthetic_images(like, num_samples=num_samples, num_test=num_test, seed=seed, image_size=image_size)


def synthetic_images(
    like: str, *, num_samples: int, num_test: int, seed: int, image_size: int | None
) -> tuple[SyntheticImages, SyntheticImages, DatasetInfo]:
    """Train/test sets shaped like dataset ``like``; ``image_size`` overrides H = W."""
    info = like_info(like, image_size)
    channels, size, num_classes = info.in_channels, info.image_size[0], info.num_classes
    train = SyntheticImages(num_samples, channels, size, num_classes, seed=seed, split=TRAIN)
    test = SyntheticImages(num_test, channels, size, num_classes, seed=seed, split=TEST)
    return train, test, info


def synthetic_text(
    like: str, *, num_samples: int, num_test: int, seed: int, batch_size: int, eval_batch_size: int, seq_len: int
) -> tuple[TokenBatches, TokenBatches, DatasetInfo]:
    """Random token streams of ``num_samples`` (train) and ``num_test`` windows of ``seq_len`` tokens.

    Each stream has ``count * seq_len + batch_size`` tokens (one extra per row for the
    shifted targets), batched like PTB: ``count // batch_size`` batches when
    ``count >= batch_size``.
    """
    info = like_info(like)
    vocab_size = info.vocab_size

    def stream(count: int, rows: int, split: int) -> Tensor:
        return torch.randint(vocab_size, (count * seq_len + rows,), generator=_generator(seed, split))

    train = TokenBatches(stream(num_samples, batch_size, TRAIN), batch_size, seq_len, name="synthetic train")
    test = TokenBatches(stream(num_test, eval_batch_size, TEST), eval_batch_size, seq_len, name="synthetic test")
    return train, test, info
