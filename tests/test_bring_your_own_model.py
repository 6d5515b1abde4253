"""Bringing your own model: a torchvision model by name, any nn.Module by ``_target_`` (docs/models.md's
example, run as written), the default layer rules (first and last layer exact), and transformers
(nn.MultiheadAttention's products reachable by surgery; the plan's approximated and skipped products)."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from doc_sections import files_and_commands
from torch import nn

from approxtrain.attention import ProjectedMultiheadAttention
from approxtrain.cli.train import composition_error
from approxtrain.cli.wandb_logger import run_config, run_name, run_tags
from approxtrain.compare import build_rows, collect_runs
from approxtrain.config import ConfigError, validate
from approxtrain.data import DatasetInfo
from approxtrain.models import build_model
from approxtrain.models.custom import dataset_fact, with_dataset_facts
from approxtrain.modules import ApproxLinear
from approxtrain.run.schema import Results, read_results
from approxtrain.run.trainer import Trainer
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import approximate_, rules_from_dicts
from conftest import CUSTOM_MODEL, write_run_dir

MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
MNIST = DatasetInfo("mnist", "image", in_channels=1, image_size=(28, 28), num_classes=10)
DIGITS = DatasetInfo("digits", "image", in_channels=1, image_size=(8, 8), num_classes=10)
TEXT = DatasetInfo("synthetic", "text", vocab_size=50, metric="perplexity")
TOPK_HALF = SamplingConfig("topk", ratio=0.5)
FIRST_LAST_EXACT = [{"position": "first", "exact": True}, {"position": "last", "exact": True}, {}]
# A shrunk CLI run: one epoch of a few steps on the CPU, no loader workers, no W&B.
SHRINK = ("trainer.epochs=1", "trainer.num_workers=0", "trainer.device=cpu", "logger=none")


def plan_of(run_dir: Path) -> dict[str, dict]:
    results = read_results(run_dir)
    assert results is not None and results["status"] == "finished", results
    return {row["name"]: row for row in results["layers"]}


# --------------------------------------------------------------------------- torchvision by name


def test_torchvision_model_trains_one_step_through_the_cli(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli("model=torchvision", "model.arch=resnet18", "dataset=synthetic", "dataset.num_samples=8",
                  "dataset.batch_size=4", "dataset.eval_batch_size=4", "trainer.max_steps=1", *SHRINK, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    assert read_results(run_dir)["steps"] == 1
    plan = plan_of(run_dir)
    assert (plan["conv1"]["policy"], plan["conv1"]["note"]) == ("exact", "first layer")  # the stem: cifar10's 3 channels
    assert (plan["fc"]["policy"], plan["fc"]["note"]) == ("exact", "last layer")
    inner = [row for name, row in plan.items() if name not in ("conv1", "fc")]
    assert len(inner) == 19 and all(row["policy"] == "topk" and row["k"] == row["n"] // 2 for row in inner)


def test_torchvision_model_is_sized_from_the_dataset(caplog):
    with caplog.at_level(logging.INFO, logger="approxtrain"):
        model = build_model({"name": "torchvision", "arch": "resnet18"}, MNIST)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert "conv1 rebuilt for 1 input channel(s) (was 3)" in caplog.text
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    vit = build_model({"name": "torchvision", "arch": "vit_b_32"}, DatasetInfo("c", "image", 3, (64, 64), 7))
    assert vit.image_size == 64 and vit.heads.head.out_features == 7


def test_an_unknown_torchvision_arch_is_one_line(run_cfg):
    with pytest.raises(ConfigError) as error:
        validate(run_cfg("model=torchvision", "model.arch=resnet19"))
    message = str(error.value)
    assert message.startswith("model.arch='resnet19' is invalid; allowed: a torchvision classification model")
    assert "torchvision.models.list_models(module=torchvision.models)" in message and "\n" not in message


# --------------------------------------------------------------------------- any nn.Module by _target_


def readme_section() -> tuple[dict[str, str], str]:
    """The file (path from the block's first-line comment -> text) and the command of the section."""
    files, commands = files_and_commands(MODELS_PAGE, "A torchvision model, or any nn.Module")
    assert len(commands) == 1 and list(files) == ["my_nets.py"], "the section shows one model file and one command"
    return files, commands[0]


def test_readme_custom_model_trains_through_the_cli(cli, tmp_path):
    files, command = readme_section()
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    words = shlex.split(command)
    assert words[0].startswith("PYTHONPATH=") and words[1] == "approxtrain"
    python_path = words[0].partition("=")[2] + os.pathsep + os.environ.get("PYTHONPATH", "")
    run_dir = tmp_path / "run"
    process = cli(*words[2:], "trainer.max_steps=3", *SHRINK, f"hydra.run.dir={run_dir}", env={"PYTHONPATH": python_path})
    assert process.returncode == 0, process.stderr
    results = read_results(run_dir)
    assert (results["model"], results["dataset"], results["steps"]) == ("my_nets.Net", "digits", 3)  # its _target_
    plan = plan_of(run_dir)
    assert plan["conv1"]["n"] == 1 and plan["conv1"]["note"] == "first layer"  # digits: one channel
    assert (plan["conv2"]["policy"], plan["conv2"]["n"], plan["conv2"]["k"]) == ("topk", 16, 8)  # model.width=16
    assert plan["fc"]["note"] == "last layer" and 0 < results["compute_reduction"] < 1


def test_custom_model_arguments_take_the_loaded_datasets_facts(run_cfg):
    model = run_cfg(*CUSTOM_MODEL, "model=custom")["model"]
    assert (model["in_channels"], model["num_classes"]) == ("${dataset.in_channels}", "${dataset.num_classes}")
    net = build_model(model, DatasetInfo("d", "image", in_channels=2, image_size=(8, 8), num_classes=7))
    assert (net.conv.in_channels, net.head.out_features) == (2, 7)
    flatten = build_model({"name": "custom", "_target_": "torch.nn.Unflatten", "dim": 1,
                           "unflattened_size": "${dataset.image_size}"}, DIGITS)
    assert list(flatten.unflattened_size) == [8, 8]  # image_size comes as [H, W]


@pytest.mark.parametrize(("model", "message"), [
    ({"_target_": "no_such_module.Net"}, r"^model._target_='no_such_module.Net' cannot be built: Error locating target"),
    ({"_target_": "byo_nets.SmallConvNet"}, r"^model._target_='byo_nets.SmallConvNet' cannot be built: .*missing 2 required"),
    ({"_target_": "builtins.dict"}, r"^model._target_='builtins.dict' returned a dict; allowed: a target that returns an nn.Module$"),
])
def test_a_custom_model_that_cannot_be_built_is_one_line(model, message):
    with pytest.raises(ValueError, match=message) as error:
        build_model({"name": "custom", **model}, DIGITS)
    assert "\n" not in str(error.value)


def test_custom_model_config_errors_are_one_line(run_cfg):
    with pytest.raises(ConfigError, match=r"^model._target_='\?\?\?' is invalid; allowed: the dotted path of a class"):
        validate(run_cfg("model=custom"))
    with pytest.raises(ValueError, match=r"dataset_info:classes\} is not a dataset fact; allowed: in_channels, image_size, num_classes"):
        dataset_fact("classes")
    line = composition_error(["model=custom", "model._target_=byo_nets.SmallConvNet", "+model.num_classes=${dataset.num_classes}"])
    assert line is not None and "\n" not in line
    assert line.startswith("Interpolation key 'dataset.num_classes' not found") and "write ${dataset_info:num_classes}" in line
    line = composition_error(["model=custom", "model._target_=byo_nets.SmallConvNet", "+model.num_classes=${dataset_info:classes}"])
    assert line is not None and "is not a dataset fact" in line


# --------------------------------------------------------------------------- default layer rules


class Backwards(nn.Module):
    """Layers registered out of call order, and a Linear whose weight is used directly (never called)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)
        self.tied = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x).mean(dim=(2, 3)))
        return self.head(F.linear(x, self.tied.weight))


def test_first_and_last_layer_rules_and_layers_never_called():
    model = Backwards()
    plan = approximate_(model, rules_from_dicts(FIRST_LAST_EXACT, TOPK_HALF), example_input=torch.randn(2, 3, 6, 6))
    rows = {row.name: row for row in plan.rows}
    assert (rows["stem"].policy, rows["stem"].note) == ("exact", "first layer")
    assert (rows["tied"].policy, rows["tied"].rule) == ("exact", 1)  # the last in module order
    assert rows["body"].policy == rows["head"].policy == "topk"
    model = Backwards()
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=torch.randn(2, 3, 6, 6))
    tied = next(row for row in plan.rows if row.name == "tied")
    assert (tied.policy, tied.k, tied.exact_macs.total) == ("exact", tied.n, 0)
    assert tied.note.startswith("never called as a module") and type(model.tied) is nn.Linear
    with pytest.raises(ValueError, match=r"layer rule position='middle' is unknown; allowed: first, last"):
        rules_from_dicts([{"position": "middle"}], TOPK_HALF)


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("need_weights", [True, False])
def test_projected_attention_computes_what_multihead_attention_does(batch_first, kdim, need_weights):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).double()
    projected = ProjectedMultiheadAttention.from_multihead_attention(attention)
    batch, target, source, width = 3, 5, 4, kdim or 8
    layout = (lambda length, features: (batch, length, features)) if batch_first else (lambda length, features: (length, batch, features))
    query = torch.randn(layout(target, 8), dtype=torch.double, requires_grad=True)
    key, value = (torch.randn(layout(source, width), dtype=torch.double) for _ in range(2))
    masks = {"attn_mask": torch.tensor([[False, False, True, False]] * target).roll(1, dims=0),  # True: may not attend
             "key_padding_mask": torch.tensor([[False, True, False, False]] * batch)}
    expected = attention(query, key, value, need_weights=need_weights, **masks)
    output = projected(query, key, value, need_weights=need_weights, **masks)
    torch.testing.assert_close(output[0], expected[0])
    assert (output[1] is None) == (expected[1] is None) and (output[1] is None or torch.allclose(output[1], expected[1]))
    (gradient,) = torch.autograd.grad(output[0].sum(), query)
    torch.testing.assert_close(gradient, torch.autograd.grad(expected[0].sum(), query)[0])


@pytest.mark.parametrize("kdim", [None, 6])
def test_projected_attention_state_dict_is_multihead_attentions(kdim):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim)
    projected = ProjectedMultiheadAttention.from_multihead_attention(attention)
    saved = projected.state_dict()
    assert sorted(saved) == sorted(attention.state_dict())
    assert all(torch.equal(tensor, attention.state_dict()[key]) for key, tensor in saved.items())
    fresh = ProjectedMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim))
    fresh.load_state_dict(attention.state_dict())  # a checkpoint of the torch module loads into the projected one
    assert all(torch.equal(getattr(fresh, name).weight, getattr(projected, name).weight) for name in ("q_proj", "k_proj", "v_proj"))


def test_transformer_plan_lists_approximated_and_skipped_products():
    model = build_model({"name": "transformer", "hidden": 16, "layers": 2, "heads": 2, "feedforward": 32}, TEXT)
    model.odd = nn.MultiheadAttention(16, 2, add_bias_kv=True)  # not reached: said so
    tokens = torch.randint(50, (4, 6))
    plan = approximate_(model, rules_from_dicts([{"type": "Linear"}], TOPK_HALF), example_input=tokens[:2], batch_size=4)
    rows = {row.name: row for row in plan.rows}
    sampled = [f"transformer.layers.{i}.{name}" for i in range(2)
               for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2")]
    for name in [*sampled, "decoder"]:
        assert rows[name].policy == "topk" and rows[name].k == rows[name].n // 2 and rows[name].exact_macs.total > 0, name
    assert "encoder" not in rows  # an embedding is a lookup: no product
    for index in range(2):
        attention = rows[f"transformer.layers.{index}.self_attn"]
        assert (attention.type, attention.policy) == ("Attention", "exact") and "activation products" in attention.note
    assert rows["odd"].type == "MultiheadAttention" and rows["odd"].note.startswith("add_bias_kv=True: torch's kernel")
    assert rows["odd.out_proj"].policy == "exact" and rows["odd.out_proj"].note.startswith("never called as a module")
    assert plan.compute_reduction == pytest.approx(0.5, abs=0.01)
    # training reaches the in-projection: it is an approximate layer, and its weight learns
    in_projection = model.transformer.layers[0].self_attn.q_proj
    assert isinstance(in_projection, ApproxLinear)
    before = in_projection.weight.detach().clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    assert not torch.equal(before, in_projection.weight)
    model.scale = nn.Parameter(torch.ones(3, 3))  # a raw weight surgery cannot see into: said so
    assert approximate_(model, []).rows[0].note == "scale: not a Linear/Conv2d/LSTM weight, its products exact; not in the MACs"


def test_transformer_trains_one_step_through_the_cli(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli("model=transformer", "model.hidden=32", "model.feedforward=64", "dataset=synthetic", "dataset.num_samples=8",
                  "dataset.batch_size=4", "dataset.eval_batch_size=4", "trainer.max_steps=1", *SHRINK, f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr
    plan = plan_of(run_dir)
    assert plan["transformer.layers.0.self_attn.q_proj"]["policy"] == "topk"
    assert plan["transformer.layers.0.self_attn"]["type"] == "Attention"
    assert read_results(run_dir)["steps"] == 1


# --------------------------------------------------------------------------- identity: name, tags, W&B config, compare


def test_a_brought_models_arch_or_target_names_the_run(run_cfg):
    torchvision = run_cfg("model=torchvision", "model.arch=vit_b_16", "dataset=digits", "ratio=0.3", "logger=wandb")
    custom = run_cfg("model=custom", "model._target_=byo_nets.SmallConvNet", "+model.in_channels=1", "+model.num_classes=10",
                     "dataset=digits", "sampler=exact", "logger=wandb")
    assert run_name(torchvision) == "torchvision.vit_b_16-digits-topk-0.3-s0"
    assert run_tags(custom)[0] == "model:byo_nets.SmallConvNet" and run_name(custom) == "byo_nets.SmallConvNet-digits-exact-s0"


def test_results_and_the_wandb_config_hold_the_built_model(run_cfg, tmp_path):
    cfg = run_cfg("model=custom", "model._target_=byo_nets.SmallConvNet", "+model.in_channels=${dataset_info:in_channels}",
                  "+model.num_classes=${dataset_info:num_classes}", "dataset=digits", "dataset.batch_size=200", "trainer.max_steps=1")
    Trainer(cfg, tmp_path / "run").fit()
    assert read_results(tmp_path / "run")["model"] == "byo_nets.SmallConvNet"
    logged = with_dataset_facts(run_config(cfg)["model"], DIGITS)  # what the W&B run's config is updated to at start
    assert (logged["in_channels"], logged["num_classes"], logged["_target_"]) == (1, 10, "byo_nets.SmallConvNet")


def test_compare_keeps_brought_architectures_apart_old_run_dirs_too(tmp_path):
    """Runs written before the label (results.json says only ``custom``) are told apart by their saved config."""
    for target in ("byo_nets.SmallConvNet", "byo_nets.OwnProductNet"):
        results = Results(model="custom", dataset="digits", sampler="exact", ratio=1.0, seed=0, layers_rule_set="paper",
                          status="finished", best_metric=0.9, final_metric=0.9)
        write_run_dir(tmp_path / target, results, f"model._target_={target}")
    runs, problems = collect_runs([tmp_path])
    assert not problems and sorted(run.model for run in runs) == ["byo_nets.OwnProductNet", "byo_nets.SmallConvNet"]
    assert sorted(table.model for table in build_rows(runs)) == ["byo_nets.OwnProductNet", "byo_nets.SmallConvNet"]


# --------------------------------------------------------------------------- an arch that needs larger images


def test_an_arch_that_needs_larger_images_says_which_image_size(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = cli("model=torchvision", "model.arch=convnext_tiny", "dataset=digits", *SHRINK, f"hydra.run.dir={run_dir}")
    assert process.returncode == 1, process.stderr  # the run fails at setup, before any step, recorded as failed
    line = process.stderr.strip().splitlines()[-1]
    assert "model.arch='convnext_tiny' cannot take the digits dataset's 8x8 images (" in line
    assert line.endswith("allowed: dataset.image_size=32 or more (the smallest tried that it takes)")
    assert read_results(run_dir)["status"] == "failed" and read_results(run_dir)["steps"] == 0


def test_a_vit_on_tiny_images_names_the_size_it_takes():
    with pytest.raises(ValueError, match=r"^model.arch='vit_b_16' cannot take the digits dataset's 8x8 images \(Input shape "
                                         r"indivisible by patch size!\); allowed: dataset.image_size=16 or more"):
        build_model({"name": "torchvision", "arch": "vit_b_16"}, DIGITS)
    assert build_model({"name": "torchvision", "arch": "vit_b_16"}, DatasetInfo("d", "image", 1, (16, 16), 10)) is not None
