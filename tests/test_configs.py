"""The Hydra configs: presets carry the paper's hyper-parameters, groups compose, validate() accepts them."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from approxtrain.cli.train import check_group_overrides, main
from approxtrain.config import ConfigError, sampler_defaults, validate
from approxtrain.data import DATASETS
from approxtrain.models import list_models, model_options, model_spec
from conftest import model_overrides, to_run_config

GROUPS = ("model", "dataset", "sampler", "layers", "logger", "trainer", "experiment")

# experiment -> (model, dataset, the paper's hyper-parameters as dotted key -> value)
PRESETS = {
    "mlp_mnist": ("mlp", "mnist", {
        "trainer.optimizer.name": "adam", "trainer.optimizer.lr": 1e-3, "dataset.batch_size": 50, "trainer.epochs": 20,
        "trainer.scheduler.name": "none", "trainer.max_steps": None,
    }),
    "cnn_mnist": ("cnn", "mnist", {
        "trainer.optimizer.name": "adam", "trainer.optimizer.lr": 1e-3, "dataset.batch_size": 50, "trainer.max_steps": 20000,
        "trainer.scheduler.name": "none",
    }),
    "lstm_ptb": ("lstm", "ptb", {
        "trainer.optimizer.name": "sgd", "trainer.optimizer.lr": 1.0, "trainer.optimizer.momentum": 0.0,
        "trainer.grad_clip": 5.0, "trainer.scheduler.name": "exponential", "trainer.scheduler.interval": "epoch",
        "trainer.scheduler.gamma": 0.8, "trainer.scheduler.start": 6, "trainer.epochs": 39, "dataset.batch_size": 20,
        "dataset.seq_len": 35, "model.hidden": 650, "model.layers": 2, "model.dropout": 0.5, "model.cell": "cudnn",
    }),
    "wrn_cifar100": ("wrn", "cifar100", {
        "trainer.optimizer.name": "sgd", "trainer.optimizer.lr": 0.1, "trainer.optimizer.momentum": 0.9,
        "trainer.optimizer.weight_decay": 0.002, "dataset.batch_size": 128, "trainer.max_steps": 75000,
        "trainer.scheduler.name": "multistep", "trainer.scheduler.milestones": [40000, 60000],
        "trainer.scheduler.interval": "step", "trainer.scheduler.gamma": 0.1, "model.depth": 28, "model.widen_factor": 10,
    }),
    "wrn_cifar10": ("wrn", "cifar10", {
        "trainer.optimizer.name": "sgd", "trainer.optimizer.lr": 0.1, "trainer.optimizer.momentum": 0.9,
        "trainer.optimizer.weight_decay": 0.002, "dataset.batch_size": 128, "trainer.max_steps": 75000,
        "trainer.scheduler.name": "multistep", "trainer.scheduler.milestones": [40000, 60000],
        "trainer.scheduler.interval": "step", "trainer.scheduler.gamma": 0.1,
    }),
    "resnet50_imagenet": ("resnet50", "imagenet", {
        "trainer.optimizer.name": "sgd", "trainer.optimizer.lr": 0.1, "trainer.optimizer.momentum": 0.9,
        "trainer.optimizer.weight_decay": 1e-4, "dataset.batch_size": 256, "trainer.epochs": 90,
        "trainer.scheduler.name": "multistep", "trainer.scheduler.milestones": [30, 60], "trainer.scheduler.interval": "epoch",
    }),
    # the paper's accuracy figures as sweeps (their sweeps in hydra.sweeper.params), k floored as the authors' code
    "fig1c_mlp": ("mlp", "mnist", {
        "trainer.optimizer.name": "adam", "dataset.batch_size": 50, "trainer.epochs": 20, "sampler.k_rounding": "floor",
        "hydra.sweeper.params.sampler": "topk,nps,nps_unscaled,uniform,uniform_replacement,uniform_unscaled",
        "hydra.sweeper.params.ratio": "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", "hydra.sweeper.params.seed": "0,1,2,3,4",
    }),
    "table2_mlp": ("mlp", "mnist", {
        "trainer.epochs": 20, "ratio": 0.4, "sampler.bwd_ratio": 0.05, "sampler.wu_ratio": 0.05, "sampler.bwd_min_k": 10,
        "sampler.wu_min_k": 10, "sampler.k_rounding": "floor", "hydra.sweeper.params.sampler": "exact,topk",
    }),
    "table2_cnn": ("cnn", "mnist", {
        "trainer.max_steps": 20000, "ratio": 0.4, "sampler.bwd_ratio": 0.2, "sampler.wu_ratio": 0.2, "sampler.bwd_min_k": 10,
        "sampler.wu_min_k": 10, "sampler.k_rounding": "floor", "hydra.sweeper.params.sampler": "exact,topk",
    }),
}

# The paper's dataset and layer choice (layers=paper) of each of its models.
PAPER = {
    "mlp": ("mnist", [{"type": "Linear"}]),
    "cnn": ("mnist", [{"match": "conv1", "exact": True}, {}]),
    "lstm": ("ptb", [{"match": "decoder"}]),
    "wrn": ("cifar100", [{"match": "conv1", "exact": True}, {"match": "fc", "exact": True}, {"type": "Conv2d"}]),
    "resnet50": ("imagenet", [{"match": "conv1", "exact": True}, {"match": "fc", "exact": True}, {"type": "Conv2d"}]),
}
# What each sampler states beyond the fields' defaults (SamplingConfig's).
SAMPLER_DIFFERENCES = {
    "exact": {"scale": False},
    "topk": {"scale": False},
    "nps": {"replacement": True},
    "uniform": {},
    "bernoulli": {},
    # presets of a policy: the paper's other Fig. 1 variants and backward-only top-k
    "nps_unscaled": {"name": "nps", "scale": False},
    "uniform_replacement": {"name": "uniform", "replacement": True},
    "uniform_unscaled": {"name": "uniform", "scale": False},
    "topk_backward": {"name": "topk", "scale": False, "mode": "backward"},
}


def compatible_datasets(model: str) -> list[str]:
    text = model_spec({"name": model}).kind == "text"
    return [name for name in DATASETS if name == "synthetic" or (name == "ptb") == text]


def test_preset_table_covers_every_experiment():
    from importlib.resources import files

    shipped = sorted(entry.name[:-5] for entry in files("approxtrain.configs").joinpath("experiment").iterdir()
                     if entry.name.endswith(".yaml"))
    assert shipped == sorted(PRESETS)


@pytest.mark.parametrize("experiment", list(PRESETS))
def test_experiment_preset_has_paper_hyperparameters(experiment, compose_cfg):
    model, dataset, expected = PRESETS[experiment]
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.model.name == model and cfg.dataset.name == dataset
    assert cfg.experiment_name == experiment
    assert cfg.hydra.runtime.choices.experiment == experiment
    for dotted, value in expected.items():
        actual = OmegaConf.select(cfg, dotted)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        assert actual == pytest.approx(value) if isinstance(value, float) else actual == value, f"{experiment}: {dotted}={actual!r}"
    resolved = to_run_config(cfg)
    assert resolved["layers"]["rules"] == PAPER[model][1]
    validate(resolved)


def test_experiment_preset_takes_further_overrides(compose_cfg):
    cfg = to_run_config(compose_cfg("experiment=wrn_cifar100", "ratio=0.3", "sampler=nps", "layers=wide_only", "dataset=synthetic"))
    assert (cfg["ratio"], cfg["sampler"]["name"], cfg["layers"]["name"]) == (0.3, "nps", "wide_only")
    assert cfg["dataset"]["name"] == "synthetic" and cfg["dataset"]["like"] == "cifar100"
    assert cfg["trainer"]["optimizer"]["lr"] == 0.1  # the preset's optimisation stays
    validate(cfg)


@pytest.mark.parametrize("model", list_models())
def test_dataset_and_layers_default_to_the_models_paper_choice(model, compose_cfg):
    cfg = compose_cfg(*model_overrides(model))
    assert cfg.model.name == model
    assert cfg.dataset.name == cfg.model.paper_dataset == cfg.hydra.runtime.choices.dataset
    resolved = to_run_config(cfg)
    assert resolved["layers"]["name"] == "paper" and resolved["layers"]["rules"] == resolved["model"]["paper_rules"]
    assert resolved["layers"]["rules"], f"model {model}: empty paper_rules"
    validate(resolved)


@pytest.mark.parametrize("model", list(PAPER))
def test_model_configs_hold_the_papers_dataset_and_layer_choice(model, compose_cfg):
    resolved = to_run_config(compose_cfg(f"model={model}"))
    assert (resolved["dataset"]["name"], resolved["layers"]["rules"]) == PAPER[model]


@pytest.mark.parametrize("model", list_models())
def test_dataset_choice_overrides_the_paper_dataset(model, compose_cfg):
    for dataset in compatible_datasets(model):
        cfg = compose_cfg(*model_overrides(model), f"dataset={dataset}")
        assert cfg.dataset.name == cfg.hydra.runtime.choices.dataset == dataset, (model, dataset)
        resolved = to_run_config(cfg)
        if dataset == "synthetic":
            assert resolved["dataset"]["like"] == resolved["model"]["paper_dataset"]
        validate(resolved)


@pytest.mark.parametrize(
    ("overrides", "model", "dataset", "like"),
    [
        (["experiment=wrn_cifar10"], "wrn", "cifar10", None),  # the preset's dataset beats the model's paper dataset
        (["experiment=wrn_cifar10", "dataset=synthetic"], "wrn", "synthetic", "cifar100"),  # the command line beats both
        (["experiment=lstm_ptb", "dataset=synthetic", "layers=gates"], "lstm", "synthetic", "ptb"),
        (["model=cnn", "experiment=wrn_cifar100"], "cnn", "cifar100", None),  # the command line's model, the preset's dataset
        (["model=wrn", "model/paper_dataset=cifar10"], "wrn", "cifar10", None),  # the paper-dataset choice itself
        (["model=wrn", "model/paper_dataset=cifar10", "dataset=synthetic"], "wrn", "synthetic", "cifar10"),
    ],
)
def test_dataset_choice_with_presets_and_overrides(overrides, model, dataset, like, compose_cfg):
    resolved = to_run_config(compose_cfg(*overrides))
    assert (resolved["model"]["name"], resolved["dataset"]["name"]) == (model, dataset)
    assert resolved["dataset"].get("like") == like
    validate(resolved)


@pytest.mark.parametrize("model", list_models())
def test_model_config_lists_every_option_with_the_builders_default(model, compose_cfg):
    """The builder's keyword-only signature owns a model's options and defaults; configs/model/<name>.yaml
    restates them for Hydra (completion, --cfg), so an option added, removed or re-defaulted in one place only
    fails here, naming the option."""
    resolved = to_run_config(compose_cfg(f"model={model}"))
    spec = model_spec(resolved["model"])
    in_yaml, in_builder, builder = model_options(resolved["model"]), spec.options, f"{spec.builder.__module__}.{spec.builder.__qualname__}"
    missing, unknown = sorted(set(in_builder) - set(in_yaml)), sorted(set(in_yaml) - set(in_builder))
    assert not missing, f"configs/model/{model}.yaml lacks {missing}, options of {builder}"
    assert not unknown, f"configs/model/{model}.yaml has {unknown}, not options of {builder}"
    differing = {option: (in_yaml[option], in_builder[option]) for option in in_builder if in_yaml[option] != in_builder[option]}
    assert not differing, f"configs/model/{model}.yaml's defaults differ from {builder}'s (yaml, builder): {differing}"


def test_every_registered_model_has_a_config_and_vice_versa():
    from importlib.resources import files

    shipped = sorted(entry.name[:-5] for entry in files("approxtrain.configs").joinpath("model").iterdir()
                     if entry.name.endswith(".yaml"))
    assert shipped == list_models()


@pytest.mark.parametrize(("overrides", "key", "value"), [
    (["model=cnn", "model.dropout=0.3"], "model.dropout", 0.3),
    (["model=lstm", "model.cell=unrolled"], "model.cell", "unrolled"),
    (["sampler=nps", "sampler.min_k=10"], "sampler.min_k", 10),
    (["sampler.bwd_ratio=0.2"], "sampler.bwd_ratio", 0.2),
    (["dataset=mnist", "dataset.image_size=16"], "dataset.image_size", 16),
])
def test_options_are_overridden_without_plus(overrides, key, value, compose_cfg):
    cfg = compose_cfg(*overrides)
    assert OmegaConf.select(cfg, key) == value
    validate(to_run_config(cfg))


@pytest.mark.parametrize("sampler", list(SAMPLER_DIFFERENCES))
def test_sampler_configs_state_only_what_differs_from_the_defaults(sampler, compose_cfg):
    resolved = to_run_config(compose_cfg(f"sampler={sampler}"))["sampler"]
    assert resolved == {**sampler_defaults(), "name": sampler, **SAMPLER_DIFFERENCES[sampler]}


def test_sampler_defaults_are_sampling_configs_less_policy_and_ratio():
    from dataclasses import fields

    from approxtrain.sampling import SamplingConfig

    expected = {field.name: field.default for field in fields(SamplingConfig)}
    assert (expected.pop("policy"), expected.pop("ratio")) == ("topk", 1.0)
    assert sampler_defaults() == expected


def test_default_config_is_mlp_on_mnist_topk_half(compose_cfg):
    cfg = compose_cfg()
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.sampler, choices.layers, choices.logger, choices.trainer) == ("mlp", "topk", "paper", "wandb", "default")
    assert (cfg.model.name, cfg.dataset.name, cfg.sampler.name, cfg.ratio, cfg.resume) == ("mlp", "mnist", "topk", 0.5, None)
    validate(to_run_config(cfg))


def test_layers_gates_unrolls_the_lstm_cell(compose_cfg):
    assert compose_cfg("model=lstm").model.cell == "cudnn"
    cfg = compose_cfg("model=lstm", "layers=gates")
    assert cfg.model.cell == "unrolled"
    resolved = to_run_config(cfg)
    assert resolved["layers"]["rules"] == [{"match": "rnn.*.gates"}, {"match": "decoder"}]
    validate(resolved)


@pytest.mark.parametrize("sampler", ["exact", "topk", "nps", "uniform", "bernoulli"])
def test_every_sampler_validates(sampler, compose_cfg):
    cfg = to_run_config(compose_cfg(f"sampler={sampler}", "ratio=0.3"))
    assert cfg["sampler"]["name"] == sampler
    validate(cfg)


def test_run_dir_defaults_to_outputs(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolving the dirs claims them (tests/test_rundir.py); resume= is main()'s
    cfg = compose_cfg()
    assert str(cfg.hydra.run.dir).startswith("outputs/runs/")
    assert str(cfg.hydra.sweep.dir).startswith("outputs/multiruns/")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ratio=1.5"], "ratio=1.5"),
        (["ratio=0"], "ratio=0"),
        (["ratio=abc"], "ratio='abc'"),
        (["trainer.optimizer.name=rmsprop"], "trainer.optimizer.name='rmsprop'"),
        (["trainer.epochs=0"], "trainer.epochs=0"),
        (["trainer.device=tpu"], "trainer.device='tpu'"),
        (["logger.mode=sometimes"], "logger.mode='sometimes'"),
        (["logger.init_timeout_s=0"], "logger.init_timeout_s=0"),
        (["logger.init_timeout_s=soon"], "logger.init_timeout_s='soon'"),
        (["layers.rules=[{type: Dense}]"], "type='Dense'"),
        (["+sampler.foo=1"], "sampler.foo"),
        (["sampler.min_k=0"], "sampler.min_k=0"),
        (["model.hidden=0"], "model.hidden=0"),
    ],
)
def test_validate_rejects_bad_values_in_one_line(overrides, message, compose_cfg):
    cfg = to_run_config(compose_cfg(*overrides))
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    text = str(error.value)
    assert message in text and "allowed" in text and "\n" not in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=wrn", "sampler=topk", "ratio=0.5"], None),
        (["-m", "sampler=exact,topk,nps", "ratio=0.3,0.5"], None),
        (["experiment=lstm_ptb", "layers=gates", "logger=none", "dataset=synthetic"], None),
        (["model=wrn", "model/paper_dataset=cifar10"], None),
        (["sampler=nope"], "sampler=nope is unknown; allowed: bernoulli, exact, nps, nps_unscaled, topk, topk_backward, uniform, "
                           "uniform_replacement, uniform_unscaled"),
        (["-m", "sampler=topk,nope"], "sampler=nope is unknown"),
        (["model=nope"], "model=nope is unknown; allowed: cnn, custom, lstm, mlp, resnet50, torchvision, transformer, wrn"),
        (["experiment=nope"], "experiment=nope is unknown"),
        (["dataset=nope"], "dataset=nope is unknown"),
        (["override layers=nope"], "layers=nope is unknown"),
    ],
)
def test_check_group_overrides(args, expected):
    error = check_group_overrides(args)
    if expected is None:
        assert error is None
    else:
        assert error is not None and error.startswith(expected)


def test_help_lists_the_groups(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["approxtrain", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("approxtrain: train neural networks")
    for group in GROUPS:
        assert f"\n{group}: " in text, f"--help does not list group {group}"
    assert ("experiment: cnn_mnist, fig1c_mlp, lstm_ptb, mlp_mnist, resnet50_imagenet, table2_cnn, table2_mlp, "
            "wrn_cifar10, wrn_cifar100") in text
    assert ("sampler: bernoulli, exact, nps, nps_unscaled, topk, topk_backward, uniform, uniform_replacement, "
            "uniform_unscaled") in text
    assert "model: cnn, custom, lstm, mlp, resnet50, torchvision, transformer, wrn" in text


@pytest.mark.parametrize("model, optimizer, weight_decay", [
    ("torchvision", "adamw", 0.05), ("custom", "adamw", 0.05), ("transformer", "adamw", 0.05),
    ("mlp", "adam", 0.0), ("cnn", "adam", 0.0), ("lstm", "adam", 0.0), ("wrn", "adam", 0.0), ("resnet50", "adam", 0.0),
])
def test_models_brought_along_default_to_adamw_and_the_paper_models_keep_theirs(model, optimizer, weight_decay, compose_cfg):
    composed = compose_cfg(f"model={model}")
    assert (composed.trainer.optimizer.name, composed.trainer.optimizer.weight_decay) == (optimizer, weight_decay)


@pytest.mark.parametrize("overrides, optimizer", [
    (["model=torchvision", "trainer.optimizer.name=sgd"], "sgd"),
    (["model=torchvision", "experiment=wrn_cifar10"], "sgd"),
])
def test_the_adamw_default_gives_way_to_a_choice(overrides, optimizer, compose_cfg):
    assert compose_cfg(*overrides).trainer.optimizer.name == optimizer
