"""What a model needs to know about a dataset, the shapes of the known datasets, and the error for a
missing one. No torch: the CLI's config store reads it."""

from __future__ import annotations

from dataclasses import dataclass

from approxtrain.checks import POSITIVE_INT, SWITCH, Check, choice, fraction, or_null

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

_ROOT = Check(lambda value: isinstance(value, str) and bool(value), "a folder, e.g. data/")
_IMAGE_SIZE = or_null(POSITIVE_INT, "null or an integer >= 1")
_VAL_FRACTION = fraction("a number in [0, 1) (0: no validation split)")
_TORCHVISION = {"root": _ROOT, "download": SWITCH, "image_size": _IMAGE_SIZE, "val_fraction": _VAL_FRACTION}
# Each dataset's own fields (configs/dataset/<name>.yaml, beside name, batch_size and eval_batch_size) and what
# each may be: the run spec checks them (approxtrain.spec.dataset_spec), the dataset's builder takes them.
DATASET_FIELDS: dict[str, dict[str, Check]] = {
    "mnist": _TORCHVISION,
    "cifar10": _TORCHVISION,
    "cifar100": _TORCHVISION,
    "imagenet": {"root": _ROOT, "image_size": _IMAGE_SIZE, "val_fraction": _VAL_FRACTION},
    "digits": {"image_size": _IMAGE_SIZE, "val_fraction": _VAL_FRACTION},
    "ptb": {"root": _ROOT, "seq_len": POSITIVE_INT, "train_split": choice("train", "valid")},
    "synthetic": {"like": choice(*LIKES), "num_samples": POSITIVE_INT, "image_size": _IMAGE_SIZE, "seq_len": POSITIVE_INT},
}
DATASETS = tuple(DATASET_FIELDS)


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
