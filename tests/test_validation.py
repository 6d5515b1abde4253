"""Bad values are refused where they enter, in one line naming the key, the value and what is
allowed; a run dir that cannot be written is one line too; rules whose k floors make every
sampled layer exact say so in one warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from test_cli import SMALL, assert_clean_failure

import approxtrain.configs
from approxtrain.config import ConfigError, validate
from approxtrain.run.rundir import claim_new_dir, hold
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import Trainer
from approxtrain.spec import field_docs
from conftest import compose_config, to_run_config

# override -> the whole message validate gives
MILESTONES = "a list of increasing integers >= 1, e.g. [30, 60]"
BAD_VALUES = {
    "trainer.grad_clip=-1": "trainer.grad_clip=-1 is invalid; allowed: a number > 0, or null",
    "trainer.grad_clip=0": "trainer.grad_clip=0 is invalid; allowed: a number > 0, or null",
    "trainer.grad_clip=abc": "trainer.grad_clip='abc' is invalid; allowed: a number > 0, or null",
    "trainer.log_every_n_steps=abc": "trainer.log_every_n_steps='abc' is invalid; allowed: an integer >= 1",
    "trainer.log_every_n_steps=0": "trainer.log_every_n_steps=0 is invalid; allowed: an integer >= 1",
    "trainer.num_workers=-1": "trainer.num_workers=-1 is invalid; allowed: an integer >= 0",
    "trainer.num_workers=two": "trainer.num_workers='two' is invalid; allowed: an integer >= 0",
    "trainer.max_steps=0": "trainer.max_steps=0 is invalid; allowed: an integer >= 1, or null",
    "trainer.channels_last=1": "trainer.channels_last=1 is invalid; allowed: auto, true, false",
    "trainer.deterministic=yes": "trainer.deterministic='yes' is invalid; allowed: true, false",
    "trainer.scheduler.milestones=abc": "trainer.scheduler.milestones='abc' is invalid; allowed: " + MILESTONES,
    "trainer.scheduler.milestones=[60,30]": "trainer.scheduler.milestones=[60, 30] is invalid; allowed: " + MILESTONES,
    "trainer.scheduler.milestones=[0,10]": "trainer.scheduler.milestones=[0, 10] is invalid; allowed: " + MILESTONES,
    "trainer.scheduler.gamma=abc": "trainer.scheduler.gamma='abc' is invalid; allowed: a number > 0",
    "trainer.scheduler.gamma=0": "trainer.scheduler.gamma=0 is invalid; allowed: a number > 0",
    "trainer.scheduler.start=-1": "trainer.scheduler.start=-1 is invalid; allowed: an integer >= 0",
    "trainer.optimizer.lr=inf": "trainer.optimizer.lr=inf is invalid; allowed: a number > 0",
    "trainer.optimizer.momentum=-0.5": "trainer.optimizer.momentum=-0.5 is invalid; allowed: a number >= 0",
    "trainer.optimizer.weight_decay=-1": "trainer.optimizer.weight_decay=-1 is invalid; allowed: a number >= 0",
    "trainer.optimizer.nesterov=maybe": "trainer.optimizer.nesterov='maybe' is invalid; allowed: true, false",
    "trainer.optimizer.betas=[0.9]": "trainer.optimizer.betas=[0.9] is invalid; allowed: two numbers in [0, 1), e.g. [0.9, 0.999]",
    "trainer.optimizer.betas=[0.9,1.0]": "trainer.optimizer.betas=[0.9, 1.0] is invalid; allowed: two numbers in [0, 1), e.g. [0.9, 0.999]",
    "trainer.optimizer.eps=0": "trainer.optimizer.eps=0 is invalid; allowed: a number > 0",
    "seed=99999999999999999999": "seed=99999999999999999999 is invalid; allowed: an integer in [0, 2**63 - 1]",
    "seed=-1": "seed=-1 is invalid; allowed: an integer in [0, 2**63 - 1]",
    "dataset.eval_batch_size=0": "dataset.eval_batch_size=0 is invalid; allowed: an integer >= 1",
    "dataset.download=maybe": "dataset.download='maybe' is invalid; allowed: true, false",
    "trainer.epochs=100000000000000000000": "trainer.epochs=100000000000000000000 is invalid; allowed: an integer in [1, 1000000]",
    "trainer.distributed.timeout_s=1e300": "trainer.distributed.timeout_s=1e+300 is invalid; allowed: a number of seconds in (0, 1e7]",
    "logger.tags=notalist": "logger.tags='notalist' is invalid; allowed: a list of strings, e.g. logger.tags=[baseline,v2]",
    "dataset.val_fraction=1.5": "dataset.val_fraction=1.5 is invalid; allowed: a number in [0, 1) (0: no validation split)",
    "dataset.image_size=0": "dataset.image_size=0 is invalid; allowed: null or an integer >= 1",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_value_is_one_line_naming_key_value_and_allowed(override):
    cfg = to_run_config(compose_config(override))
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value) == BAD_VALUES[override]


@pytest.mark.parametrize("overrides, message", [
    (["dataset=ptb", "dataset.seq_len=abc"], "dataset.seq_len='abc' is invalid; allowed: an integer >= 1"),
    (["dataset=ptb", "dataset.train_split=test"], "dataset.train_split='test' is invalid; allowed: train, valid"),
    (["dataset=synthetic", "dataset.like=svhn"],
     "dataset.like='svhn' is invalid; allowed: mnist, cifar10, cifar100, imagenet, digits, ptb"),
    (["dataset=digits", "+dataset.root=data/"],
     "dataset.root is not a field of dataset digits; allowed: the fields of dataset digits: name, batch_size, eval_batch_size, "
     "image_size, val_fraction"),
    (["schedule=linear", "schedule.anneal=-1"], "schedule.anneal=-1 is invalid; allowed: a number >= 0"),
    (["schedule=adaptive", "schedule.every=0"], "schedule.every=0 is invalid; allowed: an integer >= 1"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes' is invalid; allowed: auto, online, offline, disabled"),
    (["logger=wandb", "logger.project=''"], "logger.project='' is invalid; allowed: a name"),
    (["trainer.optimizer.name=sgd", "trainer.optimizer.momentum=0", "trainer.optimizer.nesterov=true"],
     "trainer.optimizer.nesterov=true is invalid with trainer.optimizer.momentum=0; "
     "allowed: nesterov=true with a momentum > 0, or nesterov=false"),
])
def test_bad_combination_or_dataset_field_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(to_run_config(compose_config(*overrides)))
    assert str(error.value) == message


TRAINER_KEYS = list(field_docs())  # every trainer field, as approxtrain.spec declares them


@pytest.mark.parametrize("key", TRAINER_KEYS)
def test_every_trainer_key_is_validated(key):
    with pytest.raises(ConfigError) as error:
        validate(to_run_config(compose_config(f"{key}=zzz")))
    assert str(error.value).startswith(f"{key}='zzz' is invalid; allowed: ")


@pytest.mark.parametrize("overrides", [
    ["trainer.grad_clip=5"], ["trainer.grad_clip=null"], ["trainer.scheduler.milestones=[30,60]"],
    ["trainer.scheduler.milestones=[]"], [f"seed={2**63 - 1}"], ["trainer.optimizer.betas=[0,0.5]"],
    ["trainer.optimizer.name=sgd", "trainer.optimizer.momentum=0.9", "trainer.optimizer.nesterov=true"],
    ["trainer.optimizer.name=adam", "trainer.optimizer.momentum=0", "trainer.optimizer.nesterov=true"],
    ["trainer.channels_last=true"], ["trainer.num_workers=0"], ["trainer.scheduler.gamma=1.5"],
])
def test_good_values_pass(overrides):
    validate(to_run_config(compose_config(*overrides)))


def test_negative_grad_clip_is_refused_before_training(run_cfg, run_dir):
    with pytest.raises(ConfigError, match=r"^trainer\.grad_clip=-1 is invalid"):
        Trainer(run_cfg("dataset=digits", "trainer.grad_clip=-1"), run_dir).fit()
    results = read_results(run_dir)
    assert results["status"] == "failed" and results["error"].startswith("trainer.grad_clip=-1 is invalid")
    assert results["epochs"] == [] and not list(run_dir.rglob("*.pt"))


@pytest.mark.parametrize("override, line", [
    ("trainer.scheduler.milestones=abc", "trainer.scheduler.milestones='abc' is invalid; allowed: a list of increasing integers"),
    ("model.hidden=0", "model.hidden=0 is invalid; allowed: an integer >= 1"),
    ("ratio=1.5", "ratio=1.5 is invalid; allowed: a number in (0, 1]"),
    ("dataset.val_fraction=1", "dataset.val_fraction=1 is invalid; allowed: a number in [0, 1)"),
    ("trainer.optimizer._target_=torch.optim.AdamWW", "trainer.optimizer._target_=torch.optim.AdamWW is invalid"),
])
def test_bad_value_on_the_command_line_exits_2_before_a_run_dir_exists(override, line, cli, tmp_path):
    process = cli(*SMALL, "logger=none", override)
    assert assert_clean_failure(process).startswith(line)
    assert process.returncode == 2 and not (tmp_path / "outputs").exists()


def test_every_job_of_a_basic_sweep_is_validated_before_the_sweep_starts(cli, tmp_path):
    process = cli("-m", *SMALL, "logger=none", "ratio=0.5,1.5")  # its first job is valid
    assert assert_clean_failure(process) == "ratio=1.5 is invalid; allowed: a number in (0, 1]"
    assert process.returncode == 2 and not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_a_bad_value_still_prints_with_cfg(cli):
    process = cli(*SMALL, "trainer.epochs=0", "--cfg", "job")
    assert process.returncode == 0 and "epochs: 0" in process.stdout


# ---------------------------------------------------------------------------------------------- all-exact warning


def _setup_warnings(run_cfg, run_dir, caplog, *overrides: str) -> list[str]:
    trainer = Trainer(run_cfg("dataset=digits", *overrides), run_dir)
    with caplog.at_level(logging.WARNING, logger="approxtrain"):
        trainer.setup()
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("overrides, line", [
    (["sampler.min_k=100000"], "sampler.min_k=100000 keeps every pair of every sampled layer (k = n): "
                               "this run is exact training; lower sampler.min_k"),
    (["sampler.align_k=1000"], "sampler.align_k=1000 keeps every pair of every sampled layer (k = n): "
                               "this run is exact training; lower sampler.align_k"),
    (["layers.rules=[{type: Linear, min_k: 600}]"], "layers.rules[0].min_k=600 keeps every pair of every sampled "
                                                    "layer (k = n): this run is exact training; lower layers.rules[0].min_k"),
])
def test_k_floors_that_make_every_layer_exact_are_one_warning(overrides, line, run_cfg, run_dir, caplog):
    assert _setup_warnings(run_cfg, run_dir, caplog, *overrides) == [line]


@pytest.mark.parametrize("overrides", [
    ["sampler.align_k=64"],  # k = 256 of 500: still sampled
    ["ratio=1.0", "sampler.min_k=1000"],  # the ratio itself keeps every pair
    ["sampler=exact", "sampler.min_k=1000"],  # no sampling asked for
    ["sampler.min_k=100000", "sampler.bwd_ratio=0.5"],  # the backward products are still sampled
])
def test_no_warning_when_sampling_remains_or_was_not_asked_for(overrides, run_cfg, run_dir, caplog):
    assert _setup_warnings(run_cfg, run_dir, caplog, *overrides) == []


# ---------------------------------------------------------------------------------------------- unwritable run dirs
# Tests run as root here, which chmod does not stop: a dir under a regular file cannot be created
# by anyone, and a `.lock` that is a directory cannot be opened for writing by anyone.


def test_run_dir_under_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    for make in (hold, claim_new_dir):
        with pytest.raises(ValueError) as error:
            make(tmp_path / "file" / "run")
        text = str(error.value)
        assert text.startswith(f"run dir '{tmp_path / 'file'}") and "is not writable (Not a directory" in text, text
        assert "\n" not in text


def test_run_dir_whose_lock_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(ValueError) as error:
        hold(tmp_path / "run")
    assert str(error.value).startswith(f"run dir '{tmp_path / 'run'}' is not writable (Is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only dir")
def test_read_only_run_dir_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o555)
    with pytest.raises(ValueError) as error:
        hold(run)
    assert str(error.value).startswith(f"run dir '{run}' is not writable (Permission denied")


def test_unwritable_run_dir_on_the_command_line_exits_2_in_one_line(cli, tmp_path):
    (tmp_path / "file").write_text("")
    process = cli(*SMALL, "logger=none", f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert_clean_failure(process, f"run dir '{tmp_path / 'file' / 'run'}' is not writable")
    assert process.returncode == 2 and len(process.stderr.strip().splitlines()) == 1, process.stderr


def test_record_failure_does_not_raise_when_results_cannot_be_written(run_cfg, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    trainer = Trainer(run_cfg(), tmp_path / "file" / "run")
    with caplog.at_level(logging.WARNING, logger="approxtrain"):
        assert trainer.record_failure(ValueError("bad value")) == "bad value"
    assert trainer.results.error == "bad value"
    assert any("could not be recorded" in record.getMessage() for record in caplog.records)


OUR_CONFIGS = Path(approxtrain.configs.__file__).parent


def _config_dir(tmp_path: Path, hidden: int, ratio: float | None = None) -> Path:
    """A ``--config-dir`` with its own ``model/mlp.yaml`` (our file, ``hidden`` changed) and, for a
    ``ratio``, its own ``train.yaml`` (ours, the ratio changed): files of the same name as ours."""
    configs = tmp_path / "configs"
    (configs / "model").mkdir(parents=True)
    mlp = (OUR_CONFIGS / "model" / "mlp.yaml").read_text()
    (configs / "model" / "mlp.yaml").write_text(mlp.replace("hidden: 500", f"hidden: {hidden}"))
    if ratio is not None:
        (configs / "train.yaml").write_text((OUR_CONFIGS / "train.yaml").read_text().replace("ratio: 0.5", f"ratio: {ratio}"))
    return configs


@pytest.mark.parametrize("primary", [False, True])
def test_a_config_dir_file_is_checked_in_place_of_ours(primary, cli, tmp_path):
    configs = _config_dir(tmp_path, hidden=0, ratio=0.5 if primary else None)
    process = cli("--config-dir", str(configs), *SMALL, "logger=none")
    assert assert_clean_failure(process) == "model.hidden=0 is invalid; allowed: an integer >= 1"
    assert process.returncode == 2 and not (tmp_path / "outputs").exists()


def test_a_config_dir_file_is_run_in_place_of_ours(cli, tmp_path):
    run_dir = tmp_path / "run"
    configs = _config_dir(tmp_path, hidden=7, ratio=0.25)
    process = cli("--config-dir", str(configs), *SMALL, "logger=none", "trainer.max_steps=1", f"hydra.run.dir={run_dir}")
    assert process.returncode == 0, process.stderr[-2000:]
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert composed["model"]["hidden"] == 7 and composed["ratio"] == 0.25 and read_results(run_dir)["ratio"] == 0.25
