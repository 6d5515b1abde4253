"""Image datasets: MNIST, CIFAR-10/100, ImageNet (torchvision) and scikit-learn's digits.

Every loader yields ``(input, target)`` with input ``(B, C, H, W)`` float32 and target
``(B,)`` int64. Training loaders shuffle with a ``torch.Generator`` seeded by ``seed``.
A dataset that is neither on disk nor downloadable raises
:class:`~approxtrain.data.info.DatasetNotFound` with a one-line message.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from approxtrain.data.info import DatasetInfo, not_found
from approxtrain.data.order import ShuffledLoader, worker_options

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Mean and std of all 1797 digits after scaling pixels to [0, 1] (values / 16).
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0
VAL_SPLIT_SEED = 0  # which training items are held out for validation: fixed, whatever the run's seed
IN_MEMORY_MAX_BYTES = 2**30  # a dataset without augmentation is transformed once and kept in memory up to this size


class PerImageStandardization:
    """``tf.image.per_image_standardization``: ``(x - mean(x)) / max(std(x), 1/sqrt(numel))``.

    Input: ``(C, H, W)`` float tensor. Output: same shape, zero mean, unit std per image.
    """

    def __call__(self, image: Tensor) -> Tensor:
        std = image.std(unbiased=False).clamp_min(1.0 / math.sqrt(image.numel()))
        return (image - image.mean()) / std

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def split_validation(train: Dataset, train_as_test: Dataset, val_fraction: float) -> tuple[Dataset, Dataset | None]:
    """Hold out ``round(val_fraction * len(train))`` training items as the validation set, chosen by a
    permutation from :data:`VAL_SPLIT_SEED` (the same items for every run seed), read with the test
    transform (``train_as_test``: the training items without augmentation); returns (train, validation)."""
    count = round(val_fraction * len(train))  # type: ignore[arg-type]
    if count == 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()  # type: ignore[arg-type]
    return Subset(train, sorted(order[count:])), Subset(train_as_test, sorted(order[:count]))


def make_loaders(
    train_set: Dataset,
    test_set: Dataset,
    *,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    shard: tuple[int, int] = (0, 1),
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (its order from the seed and the epoch, see :mod:`approxtrain.data.order`)
    and in-order test loader, both ``drop_last=False``; ``shard``: this rank's share of training, ``(rank, world_size)``."""
    train_loader = ShuffledLoader(train_set, batch_size=batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory,
                                  shard=shard)
    return train_loader, eval_loader(test_set, eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory)


def eval_loader(dataset: Dataset, *, eval_batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """An in-order, ``drop_last=False`` loader for evaluation (test or validation)."""
    return DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, drop_last=False, pin_memory=pin_memory,
                      **worker_options(num_workers))


def _resize(image_size: int | None, native: int) -> list[Callable]:
    """A ``Resize`` transform when ``image_size`` asks for a size other than ``native``."""
    if image_size is None or image_size == native:
        return []
    return [transforms.Resize((image_size, image_size), antialias=True)]


# How deep below dataset.root a failed download's leftovers are looked for (torchvision's layouts: root/MNIST/raw/<file>).
DOWNLOAD_DEPTH = 3


def _paths_below(root: Path, depth: int) -> set[Path]:
    """The files and folders at most ``depth`` levels below ``root`` (links not followed)."""
    found: set[Path] = set()
    for folder, subfolders, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts) + 1
        found.update(Path(folder) / name for name in [*subfolders, *files])
        if level >= depth:
            subfolders.clear()
    return found


@contextlib.contextmanager
def _removed_on_failure(root: Path) -> Iterator[None]:
    """On an exception, remove what the block created under ``root`` (``root`` and its missing parents
    included); what existed before stays."""
    root = root.absolute()
    first_missing = next((path for path in reversed([root, *root.parents]) if not path.exists()), None)
    before = set() if first_missing else _paths_below(root, DOWNLOAD_DEPTH)
    try:
        yield
    except BaseException:
        created = [first_missing] if first_missing else sorted(_paths_below(root, DOWNLOAD_DEPTH) - before)
        for path in created:  # parents before their contents: a removed folder takes its contents along
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _torchvision_dataset(factory: Callable[..., Dataset], name: str, root: str, download: bool, **kwargs) -> Dataset:
    """Open a torchvision dataset from disk; download it only if absent and ``download``.

    Any failure (missing files offline, unreachable mirror) becomes a one-line
    ``DatasetNotFound``, and what the failed download created under ``root`` is removed.
    torchvision's download chatter on stdout is replayed only when the download succeeds.
    """
    try:
        return factory(root, download=False, **kwargs)
    except (RuntimeError, OSError):
        if not download:
            raise not_found(name, root) from None
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), _removed_on_failure(Path(root)):
            dataset = factory(root, download=True, **kwargs)
    except Exception:  # noqa: BLE001 - any download failure means "not available"
        raise not_found(name, root) from None
    sys.stdout.write(chatter.getvalue())
    return dataset


def in_memory(dataset: Dataset, item_bytes: int) -> Dataset:
    """``dataset`` read once into a ``TensorDataset`` (the same tensors, without the per-item decoding and
    transforms of every epoch) when it fits in :data:`IN_MEMORY_MAX_BYTES`; only for datasets whose
    transform draws nothing at random. ``item_bytes``: the size of one transformed input."""
    if len(dataset) * item_bytes > IN_MEMORY_MAX_BYTES:  # type: ignore[arg-type]
        return dataset
    inputs, targets = zip(*(dataset[index] for index in range(len(dataset))), strict=True)  # type: ignore[arg-type]
    return TensorDataset(torch.stack(inputs), torch.as_tensor(targets, dtype=torch.int64))


def mnist(root: str, download: bool, image_size: int | None) -> tuple[Dataset, Dataset, DatasetInfo, Dataset]:
    """MNIST (torchvision layout ``root/MNIST/raw``), normalised with the usual mean/std; no augmentation,
    so the transformed images are kept in memory (:func:`in_memory`)."""
    size = image_size or 28
    transform = transforms.Compose(
        [*_resize(image_size, 28), transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)]
    )
    train, test = (in_memory(_torchvision_dataset(datasets.MNIST, "mnist", root, download, train=split, transform=transform),
                             item_bytes=4 * size * size) for split in (True, False))
    info = DatasetInfo("mnist", "image", in_channels=1, image_size=(size, size), num_classes=10)
    return train, test, info, train


def cifar(name: str, root: str, download: bool, image_size: int | None) -> tuple[Dataset, Dataset, DatasetInfo, Dataset]:
    """CIFAR-10 or CIFAR-100: pad-4 random crop + flip for training, per-image standardisation."""
    factory, num_classes = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}[name]
    size = image_size or 32
    tail = [*_resize(image_size, 32), transforms.ToTensor(), PerImageStandardization()]
    train_transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *tail])
    test_transform = transforms.Compose(tail)
    train = _torchvision_dataset(factory, name, root, download, train=True, transform=train_transform)
    test = _torchvision_dataset(factory, name, root, download, train=False, transform=test_transform)
    train_as_test = _torchvision_dataset(factory, name, root, download, train=True, transform=test_transform)
    info = DatasetInfo(name, "image", in_channels=3, image_size=(size, size), num_classes=num_classes)
    return train, test, info, train_as_test


def imagenet(root: str, image_size: int | None) -> tuple[Dataset, Dataset, DatasetInfo, Dataset]:
    """ImageNet from class folders ``root/train`` and ``root/val`` (never downloaded).

    Train: RandomResizedCrop(224) + flip; val: Resize(256) + CenterCrop(224); both
    normalised with the ImageNet mean/std. ``image_size`` replaces 224 (resize 256/224 of it).
    """
    size = image_size or 224
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    test_transform = transforms.Compose(
        [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    try:
        train = datasets.ImageFolder(str(Path(root) / "train"), transform=train_transform)
        test = datasets.ImageFolder(str(Path(root) / "val"), transform=test_transform)
        train_as_test = datasets.ImageFolder(str(Path(root) / "train"), transform=test_transform)
    except (OSError, RuntimeError):
        raise not_found("imagenet", root, what="expects class folders in train/ and val/") from None
    info = DatasetInfo("imagenet", "image", in_channels=3, image_size=(size, size), num_classes=len(train.classes))
    return train, test, info, train_as_test


def digits(image_size: int | None) -> tuple[Dataset, Dataset, DatasetInfo, Dataset]:
    """scikit-learn's 1797 real 8x8 handwritten digits (bundled, offline).

    Pixels scaled to [0, 1] (values / 16), then normalised with the dataset's mean/std.
    The 80/20 stratified split uses a fixed seed, so the test set (360 images) never changes.
    Input ``(1, 8, 8)`` (or ``(1, image_size, image_size)``, bilinear), 10 classes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - DIGITS_MEAN) / DIGITS_STD
    if image_size is not None and image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_index, test_index = train_test_split(
        torch.arange(len(targets)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_index, test_index = torch.as_tensor(train_index), torch.as_tensor(test_index)
    train = TensorDataset(images[train_index], targets[train_index])
    test = TensorDataset(images[test_index], targets[test_index])
    size = images.shape[-1]
    info = DatasetInfo("digits", "image", in_channels=1, image_size=(size, size), num_classes=10)
    return train, test, info, train
