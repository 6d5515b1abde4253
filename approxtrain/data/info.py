"""What a model needs to know about a dataset, the shapes of the known datasets, and the error for a
missing one. No torch: the CLI's config store reads it."""

from __future__ import annotations

from dataclasses import dataclass

# Datasets that work without a download: suggested whenever a dataset is missing.
OFFLINE_CHOICES = ("digits", "synthetic")
# The standard PTB vocabulary size. Models are sized for it even when only ptb.valid.txt
# and ptb.test.txt are at hand (their union has 7,596 words; ids above that go unused).
PTB_VOCAB_SIZE = 10_000
# The datasets whose shapes are known without their data (a model's paper dataset, synthetic's
# ``like``): like -> (channels, height/width, classes) for images, vocabulary size for text.
IMAGE_SHAPES = {
    "mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "imagenet": (3, 224, 1000),
    "digits": (1, 8, 10),
}
TEXT_VOCABULARIES = {"ptb": PTB_VOCAB_SIZE}
LIKES = (*IMAGE_SHAPES, *TEXT_VOCABULARIES)


@dataclass(frozen=True)
class DatasetInfo:
    """Shapes and metric of a dataset; models size their first and last layers from it.

    Image datasets fill ``in_channels``, ``image_size`` (H, W) and ``num_classes``;
    text datasets fill ``vocab_size``. ``metric`` is ``"accuracy"`` for images and
    ``"perplexity"`` for text.
    """

    name: str
    kind: str
    in_channels: int = 0
    image_size: tuple[int, int] = (0, 0)
    num_classes: int = 0
    vocab_size: int = 0
    metric: str = "accuracy"


class DatasetNotFound(ValueError):
    """A dataset is neither under ``dataset.root`` nor downloadable (one-line message)."""


def not_found(name: str, root: str, what: str = "", suggestion: str = "") -> DatasetNotFound:
    """Build the one-line :class:`DatasetNotFound` for dataset ``name`` under ``root``.

    ``what`` names the missing file(s) when that helps; ``suggestion`` is an extra way out
    (e.g. ``dataset.train_split=valid``) listed before the offline choices.
    """
    missing = f" ({what})" if what else ""
    fixes = f"{suggestion}, " if suggestion else ""
    if name == "ptb":
        offline = "dataset=synthetic with dataset.like=ptb"
    else:
        offline = ", ".join(f"dataset={choice}" for choice in OFFLINE_CHOICES)
    message = (
        f"dataset {name!r} not found under dataset.root={root!r}{missing} and it cannot be "
        f"downloaded (offline?); put it there, {fixes}or use an offline choice: {offline}"
    )
    return DatasetNotFound(" ".join(message.split()))
