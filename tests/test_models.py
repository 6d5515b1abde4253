"""Models: the registry, shapes, names, parameter counts, errors, and the unrolled LSTM against nn.LSTM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from approxtrain.data import DatasetInfo
from approxtrain.data.synthetic import like_info
from approxtrain.models import LSTMLanguageModel, build_model, list_models, model_spec
from conftest import model_overrides, to_run_config

MNIST = DatasetInfo("mnist", "image", in_channels=1, image_size=(28, 28), num_classes=10)
DIGITS = DatasetInfo("digits", "image", in_channels=1, image_size=(8, 8), num_classes=10)
CIFAR10 = DatasetInfo("cifar10", "image", in_channels=3, image_size=(32, 32), num_classes=10)
CIFAR100 = DatasetInfo("cifar100", "image", in_channels=3, image_size=(32, 32), num_classes=100)
IMAGENET = DatasetInfo("imagenet", "image", in_channels=3, image_size=(224, 224), num_classes=1000)
PTB = DatasetInfo("ptb", "text", vocab_size=10_000, metric="perplexity")
SMALL_TEXT = DatasetInfo("synthetic", "text", vocab_size=50, metric="perplexity")
KINDS = {"mlp": "image", "cnn": "image", "lstm": "text", "wrn": "image", "resnet50": "image", "torchvision": "image",
         "transformer": "text", "custom": None}


def build(name: str, info: DatasetInfo, **options) -> nn.Module:
    """``build_model`` of the model config ``{name, **options}``."""
    return build_model({"name": name, **options}, info)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def forward_backward(model: nn.Module, info: DatasetInfo, batch: int = 2, size: tuple[int, int] | None = None):
    """One training-mode forward and backward; returns the output."""
    torch.manual_seed(0)
    model.train()
    if info.kind == "image":
        height, width = size or info.image_size
        output = model(torch.randn(batch, info.in_channels, height, width))
        expected = (batch, info.num_classes)
    else:
        output = model(torch.randint(info.vocab_size, (batch, 5)))
        expected = (batch, 5, info.vocab_size)
    assert output.shape == expected
    output.float().pow(2).mean().backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)
    return output


@pytest.mark.parametrize(
    ("name", "info"),
    [
        ("mlp", MNIST),
        ("mlp", DIGITS),
        ("mlp", CIFAR10),
        ("cnn", MNIST),
        ("cnn", DIGITS),
        ("cnn", CIFAR100),
        ("wrn", CIFAR100),
        ("wrn", DIGITS),
        ("resnet50", CIFAR10),
        ("lstm", PTB),
    ],
)
def test_forward_backward_shapes(name: str, info: DatasetInfo) -> None:
    forward_backward(build(name, info), info)


@pytest.mark.parametrize(("name", "info"), [("wrn", MNIST), ("resnet50", MNIST), ("resnet50", IMAGENET)])
def test_big_models_eval_forward(name: str, info: DatasetInfo) -> None:
    """Forward only, batch 1 in eval mode (BN uses running statistics), to keep the suite fast."""
    model = build(name, info).eval()
    with torch.no_grad():
        output = model(torch.randn(1, info.in_channels, *info.image_size))
    assert output.shape == (1, info.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_from_its_config_for_its_paper_dataset(name: str, compose_cfg) -> None:
    model_config = to_run_config(compose_cfg(*model_overrides(name)))["model"]
    info = like_info(model_config["paper_dataset"])
    assert model_spec(model_config).kind in (info.kind, None)  # None: the model takes either (model=custom)
    assert isinstance(build_model(model_config, info), nn.Module)


@pytest.mark.parametrize("name", list(KINDS))
def test_spec_kind(name: str) -> None:
    assert model_spec({"name": name}).kind == KINDS[name]


@pytest.mark.parametrize(
    ("name", "info", "options", "expected"),
    [
        ("mlp", MNIST, {}, 784 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10),  # 648,010
        ("cnn", MNIST, {}, 32 * 25 + 32 + 64 * 32 * 25 + 64 + 3136 * 1024 + 1024 + 1024 * 10 + 10),  # 3,274,634
        ("wrn", CIFAR100, {}, 36_536_884),  # the literature's 36.5M (Zagoruyko & Komodakis, CIFAR-100)
        ("wrn", CIFAR10, {}, 36_479_194),
        ("resnet50", IMAGENET, {}, 25_557_032),  # torchvision's ResNet-50
        ("lstm", PTB, {}, 2 * 650 * 10_000 + 10_000 + 2 * 4 * 650 * (650 + 650 + 2)),  # 19,780,400
        ("lstm", PTB, {"cell": "unrolled"}, 2 * 650 * 10_000 + 10_000 + 2 * 4 * 650 * (650 + 650 + 1)),
    ],
)
def test_parameter_counts(name: str, info: DatasetInfo, options: dict, expected: int) -> None:
    assert count_parameters(build(name, info, **options)) == expected


@pytest.mark.parametrize(
    ("name", "info", "options", "shapes"),
    [
        ("mlp", MNIST, {}, {"fc1": (500, 784), "fc2": (500, 500), "fc3": (10, 500)}),
        ("mlp", DIGITS, {}, {"fc1": (500, 64), "fc3": (10, 500)}),
        ("cnn", MNIST, {}, {"conv1": (32, 1, 5, 5), "conv2": (64, 32, 5, 5), "fc1": (1024, 3136), "fc2": (10, 1024)}),
        ("cnn", DIGITS, {}, {"fc1": (1024, 64 * 2 * 2)}),
        (
            "wrn",
            CIFAR100,
            {},
            {
                "conv1": (16, 3, 3, 3),
                "block1.0.conv1": (160, 16, 3, 3),
                "block1.0.shortcut": (160, 16, 1, 1),
                "block1.3.conv2": (160, 160, 3, 3),
                "block2.0.conv1": (320, 160, 3, 3),
                "block2.0.shortcut": (320, 160, 1, 1),
                "block3.0.conv1": (640, 320, 3, 3),
                "block3.3.conv2": (640, 640, 3, 3),
                "fc": (100, 640),
            },
        ),
        (
            "resnet50",
            CIFAR10,
            {},
            {"conv1": (64, 3, 7, 7), "layer1.0.conv1": (64, 64, 1, 1), "layer1.0.downsample.0": (256, 64, 1, 1)},
        ),
        ("resnet50", MNIST, {}, {"conv1": (64, 1, 7, 7), "fc": (10, 2048)}),
        ("lstm", PTB, {}, {"encoder": (10_000, 650), "decoder": (10_000, 650)}),
        ("lstm", PTB, {"cell": "unrolled"}, {"rnn.0.gates": (2600, 1300), "rnn.1.gates": (2600, 1300)}),
    ],
)
def test_module_names_and_weight_shapes(name: str, info: DatasetInfo, options: dict, shapes: dict) -> None:
    modules = dict(build(name, info, **options).named_modules())
    for qualified_name, shape in shapes.items():
        assert qualified_name in modules, qualified_name
        assert tuple(modules[qualified_name].weight.shape) == shape, qualified_name


def test_wrn_structure() -> None:
    modules = dict(build("wrn", CIFAR100).named_modules())
    convs = [name for name, module in modules.items() if isinstance(module, nn.Conv2d)]
    assert len([name for name in convs if not name.endswith("shortcut")]) == 25  # conv1 + 3 groups x 4 blocks x 2
    assert sorted(name for name in convs if name.endswith("shortcut")) == [
        "block1.0.shortcut",
        "block2.0.shortcut",
        "block3.0.shortcut",
    ]
    assert modules["block1.1"].shortcut is None
    assert all(module.bias is None for module in modules.values() if isinstance(module, nn.Conv2d))
    assert modules["block2.0.conv1"].stride == (2, 2) and modules["block1.0.conv1"].stride == (1, 1)


def test_lstm_cudnn_has_one_nn_lstm_named_rnn() -> None:
    model = build("lstm", PTB)
    assert isinstance(model.rnn, nn.LSTM)
    assert (model.rnn.num_layers, model.rnn.hidden_size, model.rnn.dropout) == (2, 650, 0.5)
    assert all(-0.05 <= parameter.min() and parameter.max() <= 0.05 for parameter in model.parameters())


def copy_lstm_into_unrolled(cudnn: LSTMLanguageModel, unrolled: LSTMLanguageModel) -> None:
    unrolled.encoder.load_state_dict(cudnn.encoder.state_dict())
    unrolled.decoder.load_state_dict(cudnn.decoder.state_dict())
    with torch.no_grad():
        for layer in range(cudnn.rnn.num_layers):
            weight_ih = getattr(cudnn.rnn, f"weight_ih_l{layer}")
            weight_hh = getattr(cudnn.rnn, f"weight_hh_l{layer}")
            bias = getattr(cudnn.rnn, f"bias_ih_l{layer}") + getattr(cudnn.rnn, f"bias_hh_l{layer}")
            unrolled.rnn[layer].gates.weight.copy_(torch.cat([weight_ih, weight_hh], dim=1))
            unrolled.rnn[layer].gates.bias.copy_(bias)


@pytest.mark.parametrize("hidden", [16, 650])
def test_unrolled_lstm_equals_cudnn_lstm(hidden: int) -> None:
    torch.manual_seed(0)
    cudnn = build("lstm", SMALL_TEXT, hidden=hidden).eval()
    unrolled = build("lstm", SMALL_TEXT, hidden=hidden, cell="unrolled").eval()
    copy_lstm_into_unrolled(cudnn, unrolled)
    tokens = torch.randint(SMALL_TEXT.vocab_size, (3, 2, 7))
    with torch.no_grad():
        for batch in tokens:  # consecutive batches: the carried state must agree too
            torch.testing.assert_close(unrolled(batch), cudnn(batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrolled.state[0], cudnn.state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrolled.state[1], cudnn.state[1], atol=1e-5, rtol=1e-5)


def test_unrolled_lstm_gradients_equal_cudnn() -> None:
    torch.manual_seed(1)
    cudnn = build("lstm", SMALL_TEXT, hidden=8).eval()
    unrolled = build("lstm", SMALL_TEXT, hidden=8, cell="unrolled").eval()
    with torch.no_grad():  # larger weights than the 0.05 init, so gradients are far above the tolerance
        for parameter in cudnn.parameters():
            parameter.uniform_(-0.8, 0.8)
    copy_lstm_into_unrolled(cudnn, unrolled)
    tokens = torch.randint(SMALL_TEXT.vocab_size, (2, 6))
    cudnn(tokens).square().sum().backward()
    unrolled(tokens).square().sum().backward()
    torch.testing.assert_close(unrolled.encoder.weight.grad, cudnn.encoder.weight.grad, atol=1e-5, rtol=1e-4)
    expected = torch.cat([cudnn.rnn.weight_ih_l0.grad, cudnn.rnn.weight_hh_l0.grad], dim=1)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(unrolled.rnn[0].gates.weight.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["cudnn", "unrolled"])
def test_lstm_carries_detached_state_across_calls(cell: str) -> None:
    torch.manual_seed(0)
    model = build("lstm", SMALL_TEXT, hidden=8, cell=cell).eval()
    first, second = torch.randint(SMALL_TEXT.vocab_size, (2, 3, 4))
    fresh = model(second)
    model.reset_state()
    model(first)
    carried = model(second)
    assert not torch.allclose(carried, fresh)  # the state from `first` changed the output
    model.reset_state()
    torch.testing.assert_close(model(second), fresh)
    model(first)
    assert torch.equal(model(second[:2]), fresh[:2])  # batch size changed: fresh zero state
    # Truncated BPTT: two training steps backward without touching the previous graph.
    model.train()
    for _ in range(2):
        model(first).sum().backward()
    assert model.state[0].requires_grad is False


@pytest.mark.parametrize(
    ("name", "info", "fragments"),
    [
        ("lstm", MNIST, ["'lstm'", "text", "'mnist'", "ptb", "synthetic"]),
        ("wrn", PTB, ["'wrn'", "image", "'ptb'", "cifar100", "synthetic"]),
        ("mlp", SMALL_TEXT, ["'mlp'", "image", "'synthetic'"]),
    ],
)
def test_text_image_mismatch_is_one_line_value_error(name: str, info: DatasetInfo, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        build(name, info)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_model_and_option() -> None:
    allowed = "cnn, custom, lstm, mlp, resnet50, torchvision, transformer, wrn"
    with pytest.raises(ValueError, match=rf"unknown model 'vgg'; allowed: {allowed}") as error:
        build("vgg", MNIST)
    assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match=r"unknown option 'width'.*'mlp'.*hidden"):
        build("mlp", MNIST, width=3)
    with pytest.raises(TypeError, match=r"unknown option 'depth'.*'resnet50'"):
        build("resnet50", CIFAR10, depth=18)
    with pytest.raises(ValueError, match=r"model.cell='gru' is invalid; allowed: cudnn, unrolled"):
        build("lstm", PTB, cell="gru")
    with pytest.raises(ValueError, match=r"6n \+ 4"):
        build("wrn", CIFAR10, depth=27)


@pytest.mark.parametrize("model, option, value, allowed", [
    ("mlp", "hidden", "abc", "an integer >= 1"),
    ("mlp", "hidden", 0, "an integer >= 1"),
    ("mlp", "hidden", 2.5, "an integer >= 1"),
    ("cnn", "dropout", 1.0, "a number in [0, 1)"),
    ("cnn", "dropout", True, "a number in [0, 1)"),
    ("lstm", "layers", -1, "an integer >= 1"),
    ("lstm", "cell", "gru", "cudnn, unrolled"),
    ("wrn", "depth", 27, "6n + 4"),
    ("wrn", "widen_factor", "ten", "an integer >= 1"),
])
def test_bad_option_value_is_named_with_the_allowed_values(model, option, value, allowed) -> None:
    spec = model_spec({"name": model})
    with pytest.raises(ValueError) as error:
        spec.check_options({option: value})
    message = str(error.value)
    assert message.startswith(f"model.{option}={value!r} is invalid; allowed: ") and allowed in message
    assert "\n" not in message
    spec.check_options({})  # the paper's defaults need no option
    spec.check_options(spec.options)


def test_options_change_the_model() -> None:
    assert build("mlp", MNIST, hidden=32).fc1.out_features == 32
    small = build("wrn", CIFAR10, depth=10, widen_factor=2, dropout=0.3)
    assert len(small.block1) == 1 and small.fc.in_features == 128
    assert small.block1[0].dropout.p == 0.3
    forward_backward(small, CIFAR10)
    lstm = build("lstm", SMALL_TEXT, hidden=12, layers=3, dropout=0.1, cell="unrolled")
    assert len(lstm.rnn) == 3 and lstm.rnn.dropout == 0.1 and lstm.dropout.p == 0.1
    forward_backward(lstm, SMALL_TEXT)
