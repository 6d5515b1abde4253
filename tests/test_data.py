"""Datasets and loaders: offline datasets, synthetic shapes, shared real data, errors."""

from __future__ import annotations

import inspect
import math
import urllib.error
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from approxtrain.data import DATASETS, DatasetInfo, DatasetNotFound, build_loaders, dataset_builder
from approxtrain.data.images import PerImageStandardization
from approxtrain.data.info import DATASET_FIELDS, IMAGE_SHAPES
from approxtrain.data.text import TokenBatches, build_vocabulary

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy")
needs_ptb = pytest.mark.skipif(not (SHARED_DATA / "PTB" / "ptb.test.txt").is_file(), reason="no shared PTB copy")
DATASET_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"


def dataset_config(name: str, **fields) -> dict:
    """The shipped ``configs/dataset/<name>.yaml`` with ``fields`` replaced (or added)."""
    return {**OmegaConf.to_container(OmegaConf.load(DATASET_CONFIGS / f"{name}.yaml")), **fields}


def loaders(name: str, *, seed: int = 0, **fields):
    """``build_loaders`` of the shipped config of dataset ``name`` with ``fields`` replaced: (train, test, info)."""
    return build_loaders(dataset_config(name, **fields), num_workers=0, seed=seed, pin_memory=False)[:3]


def assert_one_line_not_found(error: pytest.ExceptionInfo, name: str, root: Path | str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert f"dataset {name!r}" in message
    assert repr(str(root)) in message
    assert "synthetic" in message


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*loader)
    return torch.cat(inputs), torch.cat(targets)


# ---------------------------------------------------------------- digits (offline, real)


def test_digits_shapes_and_info() -> None:
    train, test, info = loaders("digits", batch_size=64, val_fraction=0.0)
    assert info == DatasetInfo("digits", "image", in_channels=1, image_size=(8, 8), num_classes=10)
    assert len(train.dataset) + len(test.dataset) == 1797
    assert len(test.dataset) == 360
    assert len(train) == math.ceil(1437 / 64)
    inputs, targets = next(iter(train))
    assert inputs.shape == (64, 1, 8, 8) and inputs.dtype == torch.float32
    assert targets.shape == (64,) and targets.dtype == torch.int64
    all_inputs, all_targets = collect(train)
    assert abs(all_inputs.mean()) < 0.05 and abs(all_inputs.std() - 1) < 0.05  # normalised
    assert set(all_targets.tolist()) == set(range(10))


def test_digits_test_split_is_fixed_and_stratified() -> None:
    _, test_a, _ = loaders("digits", batch_size=50, seed=0)
    _, test_b, _ = loaders("digits", batch_size=50, eval_batch_size=7, seed=123)
    inputs_a, targets_a = collect(test_a)
    inputs_b, targets_b = collect(test_b)
    assert torch.equal(inputs_a, inputs_b) and torch.equal(targets_a, targets_b)
    assert targets_a.bincount(minlength=10).min() >= 35  # ~36 per class


def test_train_shuffle_is_seeded() -> None:
    def first(seed: int) -> torch.Tensor:
        return next(iter(loaders("digits", batch_size=32, seed=seed)[0]))[1]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    train, _, _ = loaders("digits", batch_size=32, seed=0)
    epoch_one = [target for _, target in train]
    train.set_epoch(2)
    assert not torch.equal(next(iter(train))[1], epoch_one[0])  # a new order each epoch
    train.set_epoch(1, start_batch=3)  # an epoch continued mid-way: the batches it had left
    assert all(torch.equal(a, b) for a, b in zip([target for _, target in train], epoch_one[3:], strict=True))


def test_digits_image_size_resizes() -> None:
    train, _, info = loaders("digits", batch_size=4, image_size=16)
    assert info.image_size == (16, 16)
    assert next(iter(train))[0].shape == (4, 1, 16, 16)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("like", "shape", "classes"),
    [
        ("mnist", (1, 28, 28), 10),
        ("cifar10", (3, 32, 32), 10),
        ("cifar100", (3, 32, 32), 100),
        ("imagenet", (3, 224, 224), 1000),
    ],
)
def test_synthetic_images_have_real_shapes(like: str, shape: tuple[int, ...], classes: int) -> None:
    train, test, info = loaders("synthetic", like=like, batch_size=4, eval_batch_size=4, num_samples=8)
    assert info == DatasetInfo("synthetic", "image", shape[0], shape[1:], classes)
    assert len(train.dataset) == 8 and len(train) == 2
    assert len(test.dataset) == 4  # a quarter, at least one batch
    inputs, targets = next(iter(train))
    assert inputs.shape == (4, *shape) and inputs.dtype == torch.float32
    assert targets.dtype == torch.int64 and 0 <= targets.min() and targets.max() < classes


def test_synthetic_is_deterministic_per_seed() -> None:
    def data(seed: int) -> tuple[torch.Tensor, ...]:
        train, test, _ = loaders("synthetic", like="cifar10", batch_size=16, eval_batch_size=16, num_samples=32, seed=seed)
        return (*collect(train), *collect(test))

    same, again, other = data(3), data(3), data(4)
    for tensor_a, tensor_b in zip(same, again):
        assert torch.equal(tensor_a, tensor_b)
    assert not torch.equal(same[2], other[2])  # the test set depends on the seed too
    train_inputs, _, test_inputs, _ = same
    assert not any(torch.equal(test_inputs[0], image) for image in train_inputs)


def test_synthetic_test_set_is_at_least_one_batch_and_image_size_overrides() -> None:
    train, test, info = loaders(
        "synthetic", like="imagenet", batch_size=2, eval_batch_size=8, num_samples=4, image_size=32
    )
    assert info.image_size == (32, 32) and info.num_classes == 1000
    assert len(test.dataset) == 8 and len(test) == 1
    assert next(iter(test))[0].shape == (8, 3, 32, 32)


def test_synthetic_text_like_ptb() -> None:
    train, test, info = loaders("synthetic", like="ptb", batch_size=4, eval_batch_size=4, num_samples=40, seq_len=10, seed=1)
    assert info == DatasetInfo("synthetic", "text", vocab_size=10_000, metric="perplexity")
    assert len(train) == 10 and len(test) == 2  # num_samples // batch_size windows; test: 10 samples
    inputs, targets = next(iter(train))
    assert inputs.shape == targets.shape == (4, 10) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    again, _, _ = loaders("synthetic", like="ptb", batch_size=4, eval_batch_size=4, num_samples=40, seq_len=10, seed=1)
    assert torch.equal(next(iter(again))[0], inputs)


# ---------------------------------------------------------------- text batching


def test_token_batches_follow_the_stream_in_order() -> None:
    batches = TokenBatches(torch.arange(23), batch_size=2, seq_len=3)  # rows 0..10 and 11..21
    assert len(batches) == 3  # (11 - 1) // 3
    assert batches.num_tokens == 3 * 2 * 3
    pairs = list(batches)
    assert torch.equal(pairs[0][0], torch.tensor([[0, 1, 2], [11, 12, 13]]))
    assert torch.equal(pairs[0][1], torch.tensor([[1, 2, 3], [12, 13, 14]]))
    assert torch.equal(pairs[2][1], torch.tensor([[7, 8, 9], [18, 19, 20]]))
    assert len(list(batches)) == 3  # re-iterable
    with pytest.raises(ValueError, match="too short"):
        TokenBatches(torch.arange(10), batch_size=4, seq_len=3)


def test_vocabulary_sorted_by_frequency_then_word() -> None:
    vocabulary = build_vocabulary([["b", "a", "c", "a"], ["c", "d", "a"]])
    assert vocabulary == {"a": 0, "c": 1, "b": 2, "d": 3}


# ---------------------------------------------------------------- shared real data


@needs_mnist
def test_mnist_from_shared_folder() -> None:
    train, test, info = loaders("mnist", root=str(SHARED_DATA), download=False, batch_size=50, eval_batch_size=50)
    assert info == DatasetInfo("mnist", "image", in_channels=1, image_size=(28, 28), num_classes=10)
    assert len(train.dataset) == 4500 and len(test.dataset) == 10_000  # 500 of the 5000 held out for validation
    assert len(train) == 90 and len(test) == 200
    inputs, targets = next(iter(test))
    assert inputs.shape == (50, 1, 28, 28) and inputs.dtype == torch.float32
    assert targets.shape == (50,) and targets.dtype == torch.int64
    assert abs(inputs.mean()) < 0.3 and 0.7 < inputs.std() < 1.3  # roughly normalised


def test_in_memory_keeps_every_item_and_respects_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import transforms

    from approxtrain.data import images

    class Decoded(torch.utils.data.Dataset):  # a torchvision-style dataset: decodes and transforms on every read
        transform = transforms.Normalize((0.5,), (0.25,))

        def __len__(self) -> int:
            return 7

        def __getitem__(self, index: int):
            return self.transform(torch.full((1, 2, 2), float(index))), index % 3

    lazy = Decoded()
    kept = images.in_memory(lazy, item_bytes=16)
    assert isinstance(kept, torch.utils.data.TensorDataset) and len(kept) == 7
    for index in range(7):
        assert torch.equal(kept[index][0], lazy[index][0]) and int(kept[index][1]) == lazy[index][1]
    monkeypatch.setattr(images, "IN_MEMORY_MAX_BYTES", 7 * 16 - 1)
    assert images.in_memory(lazy, item_bytes=16) is lazy


@needs_ptb
def test_ptb_from_shared_folder() -> None:
    train, test, info = loaders("ptb", root=str(SHARED_DATA), batch_size=20, eval_batch_size=20, seq_len=35, train_split="valid")
    assert info == DatasetInfo("ptb", "text", vocab_size=10_000, metric="perplexity")
    assert len(train) == (73_760 // 20 - 1) // 35 and len(test) == (82_430 // 20 - 1) // 35
    pairs = list(test)
    for inputs, targets in pairs[:3]:
        assert inputs.shape == targets.shape == (20, 35)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(pairs[0][1][:, -1], pairs[1][0][:, 0])  # in order: the next window continues
    all_inputs = torch.cat([inputs for inputs, _ in pairs])
    assert 0 <= all_inputs.min() and all_inputs.max() < info.vocab_size
    assert (all_inputs == 0).float().mean() > 0.03  # id 0 is the most frequent word (the)


@needs_ptb
def test_ptb_vocabulary_of_the_shared_files() -> None:
    from approxtrain.data.text import read_words

    words = [read_words(SHARED_DATA / "PTB" / f"ptb.{split}.txt") for split in ("valid", "test")]
    assert (len(words[0]), len(words[1])) == (73_760, 82_430)
    vocabulary = build_vocabulary(words)
    assert len(vocabulary) <= 10_000 and {"<unk>", "N", "<eos>"} <= vocabulary.keys()


@needs_ptb
def test_ptb_without_train_file_suggests_valid_split() -> None:
    with pytest.raises(DatasetNotFound) as error:
        loaders("ptb", root=str(SHARED_DATA), batch_size=20)
    assert_one_line_not_found(error, "ptb", SHARED_DATA)
    assert "ptb.train.txt" in str(error.value) and "train_split=valid" in str(error.value)


# ---------------------------------------------------------------- images on disk


def test_imagenet_from_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("n01", "n02"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (40, 30), color=(index * 40, 10, 200)).save(folder / f"{index}.png")
    train, test, info = loaders("imagenet", root=str(tmp_path), batch_size=4, eval_batch_size=4, image_size=24)
    assert info == DatasetInfo("imagenet", "image", in_channels=3, image_size=(24, 24), num_classes=2)
    assert len(train) == 2 and len(test) == 2
    inputs, targets = next(iter(test))
    assert inputs.shape == (4, 3, 24, 24) and targets.dtype == torch.int64


def test_per_image_standardization() -> None:
    image = torch.rand(3, 8, 8) * 5 + 2
    standardized = PerImageStandardization()(image)
    assert abs(standardized.mean()) < 1e-5 and abs(standardized.std(unbiased=False) - 1) < 1e-4
    constant = PerImageStandardization()(torch.full((3, 4, 4), 0.7))
    torch.testing.assert_close(constant, torch.zeros(3, 4, 4), atol=1e-5, rtol=0)  # std floored: no NaN


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "imagenet", "ptb"])
def test_missing_dataset_without_download_is_one_line(name: str, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFound) as error:
        loaders(name, root=str(root), batch_size=4, **({"download": False} if "download" in dataset_config(name) else {}))
    assert_one_line_not_found(error, name, root)
    if name != "ptb":
        assert "dataset=digits" in str(error.value)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_failed_download_is_one_line(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Offline download (simulated, so the test never fetches anything) -> DatasetNotFound."""
    import torchvision.datasets.cifar
    import torchvision.datasets.mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFound) as error:
        loaders(name, root=str(tmp_path), download=True, batch_size=4)
    assert_one_line_not_found(error, name, tmp_path)
    assert error.value.__suppress_context__  # no chained torchvision traceback
    assert capsys.readouterr().out == ""  # torchvision's download chatter is not shown


def test_dataset_not_found_is_a_value_error() -> None:
    assert issubclass(DatasetNotFound, ValueError)


def bad_config(name: str, **fields) -> dict:
    """The shipped config of ``name`` with ``fields`` replaced; a field set to ``...`` is removed."""
    return {key: value for key, value in dataset_config(name, **fields).items() if value is not ...}


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"name": "svhn", "batch_size": 4, "eval_batch_size": 4}, r"dataset.name='svhn' is invalid; allowed: " + ", ".join(DATASETS)),
        (bad_config("synthetic", like="svhn"), r"dataset.like='svhn' is invalid; allowed: mnist, .*ptb$"),
        (bad_config("synthetic", like="mnist", num_samples=0), r"dataset.num_samples=0 is invalid; allowed: an integer >= 1"),
        (bad_config("ptb", train_split="test"), r"train_split='test'.*train, valid"),
        (bad_config("digits", train_split="valid"),
         r"dataset.train_split is not a field of dataset digits; allowed: the fields of dataset digits: "
         r"name, batch_size, eval_batch_size, image_size, val_fraction$"),
        (bad_config("mnist", root=...), r"dataset.root is missing; allowed: the fields of dataset mnist: "
                                        r"name, batch_size, eval_batch_size, root, download, image_size, val_fraction$"),
        (bad_config("digits", batch_size=0), r"dataset.batch_size=0 is invalid; allowed: an integer >= 1"),
        (bad_config("digits", eval_batch_size=None), r"dataset.eval_batch_size=None is invalid; allowed: an integer >= 1"),
        (bad_config("digits", image_size=0), r"dataset.image_size=0 is invalid; allowed: null or an integer >= 1"),
    ],
)
def test_bad_fields_are_one_line_value_errors(config: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as error:
        build_loaders(config, num_workers=0, seed=0, pin_memory=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", DATASETS)
def test_each_dataset_builder_takes_exactly_the_fields_the_spec_checks(name: str) -> None:
    """``DATASET_FIELDS`` (what the run spec checks) and the builder's parameters name the same fields
    (image datasets: but ``val_fraction``, which build_loaders applies; keyword-only: the loader's context)."""
    parameters = inspect.signature(dataset_builder(name)).parameters.values()
    taken = [parameter.name for parameter in parameters if parameter.kind != inspect.Parameter.KEYWORD_ONLY]
    assert taken == [field for field in DATASET_FIELDS[name] if field != "val_fraction"]
    assert ("val_fraction" in DATASET_FIELDS[name]) == (name in IMAGE_SHAPES)


@pytest.mark.parametrize("name", DATASETS)
def test_every_shipped_dataset_config_has_exactly_its_fields(name: str, tmp_path: Path) -> None:
    """Each YAML is what build_loaders takes: the data loads, or the run stops at the missing data."""
    config = dataset_config(name, batch_size=2, eval_batch_size=2)
    config.update({key: value for key, value in (("root", str(tmp_path)), ("download", False)) if key in config})
    if name == "synthetic":  # `like` is the model's paper dataset in a run
        config.update(like="mnist", num_samples=4)
    try:
        info = build_loaders(config, num_workers=0, seed=0, pin_memory=False).info
    except DatasetNotFound:
        assert name not in ("digits", "synthetic")
    else:
        assert info.name == name


def test_image_datasets_hold_out_a_fixed_validation_part() -> None:
    config = dataset_config("digits", batch_size=50)
    assert config["val_fraction"] == 0.1
    first = build_loaders(config, num_workers=0, seed=0, pin_memory=False)
    other_seed = build_loaders(config, num_workers=0, seed=7, pin_memory=False)
    train, val = first.train.dataset.dataset, first.val.dataset  # ShuffledLoader wraps SeededItems(Subset)
    assert len(val) == round(0.1 * 1437) == 144 and len(train) == 1437 - 144
    assert not set(train.indices) & set(val.indices)  # disjoint, together the whole training set
    assert sorted(train.indices + val.indices) == list(range(1437))
    assert val.indices == other_seed.val.dataset.indices  # the same items whatever the run's seed
    none = build_loaders({**config, "val_fraction": 0.0}, num_workers=0, seed=0, pin_memory=False)
    assert none.val is None and len(none.train.dataset) == 1437


@pytest.mark.parametrize("value", [1.0, -0.1, "a", True])
def test_bad_val_fraction_is_one_line(value) -> None:
    with pytest.raises(ValueError, match=r"^dataset.val_fraction=.* is invalid; allowed: a number in \[0, 1\)"):
        build_loaders(dataset_config("digits", val_fraction=value), num_workers=0, seed=0, pin_memory=False)


def test_ptb_validates_on_valid_unless_it_trains_on_it(tmp_path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.{split}.txt").write_text(" ".join(f"w{i % 50}" for i in range(3000)) + "\n")
    on_train = build_loaders(dataset_config("ptb", root=str(tmp_path), batch_size=4, eval_batch_size=4, seq_len=5),
                             num_workers=0, seed=0, pin_memory=False)
    assert on_train.val is not None and len(on_train.val) > 0
    on_valid = build_loaders(dataset_config("ptb", root=str(tmp_path), batch_size=4, eval_batch_size=4, seq_len=5,
                                            train_split="valid"), num_workers=0, seed=0, pin_memory=False)
    assert on_valid.val is None


def test_a_failed_download_removes_only_what_it_created(tmp_path: Path, monkeypatch) -> None:
    """torchvision creates ``<root>/MNIST/raw`` and a partial file, then the download fails: both go,
    while folders and files that were there before stay."""
    import torchvision.datasets.mnist

    def partial_then_offline(url, download_root, **kwargs):
        Path(download_root, "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise urllib.error.URLError("Connection reset by peer")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", partial_then_offline)
    fresh = tmp_path / "fresh" / "data"
    with pytest.raises(DatasetNotFound):
        loaders("mnist", root=str(fresh), download=True, batch_size=4)
    assert not (tmp_path / "fresh").exists()  # the missing root and its missing parent were created by the download
    kept = tmp_path / "kept"
    (kept / "MNIST" / "processed").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DatasetNotFound):
        loaders("mnist", root=str(kept), download=True, batch_size=4)
    assert sorted(str(path.relative_to(kept)) for path in kept.rglob("*")) == ["MNIST", "MNIST/processed", "notes.txt"]
