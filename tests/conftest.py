"""Shared fixtures: configs composed through Hydra's compose API (shrunk for CPU tests),
a run dir under tmp_path (and a writer of finished ones), the shared real data, and a
runner for the installed CLI."""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

import approxtrain.cli.train  # noqa: F401  (registers the `resume_dir` resolver used by hydra.run.dir)
from approxtrain.extras import EXTRAS, installed
from approxtrain.run.rundir import write_results
from approxtrain.run.schema import EPOCH_KEYS, RESULT_KEYS, Results  # noqa: F401  (the results contract, for the tests)

CONFIG_MODULE = "approxtrain.configs"
# The real data of this workplace (../shared/data from the project root); absent on a user's machine.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# A shrunk run: one epoch, CPU, no loader workers, no W&B.
FAST = ("logger=none", "trainer.epochs=1", "trainer.num_workers=0", "trainer.device=cpu")
PLAN_ROW_KEYS = ("name", "type", "n", "k", "ratio", "policy", "exact_macs", "approx_macs")
# What choosing a model needs beyond ``model=<name>``: model=custom has no default _target_.
CUSTOM_MODEL = ("model._target_=byo_nets.SmallConvNet", "+model.in_channels=${dataset_info:in_channels}",
                "+model.num_classes=${dataset_info:num_classes}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.extra("slurm")``: the test needs that optional extra; without it, it is skipped
    with a reason that says how to install it (CI runs them after installing the extras: ``-m extra``)."""
    for mark in item.iter_markers("extra"):
        (name,) = mark.args
        assert name in EXTRAS, f"extra({name!r}): allowed: {', '.join(EXTRAS)}"
        if not installed(name):
            pytest.skip(f"needs the {name} extra: pip install -e .[{name}]")


def model_overrides(model: str) -> tuple[str, ...]:
    """The overrides that choose ``model`` (``model=<name>``, plus a target for ``custom``)."""
    return (f"model={model}", *(CUSTOM_MODEL if model == "custom" else ()))


def compose_config(*overrides: str, return_hydra_config: bool = True) -> DictConfig:
    """The ``train`` config composed with ``overrides``, as the CLI would compose it."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def to_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved plain dict the app passes to ``train()`` (the ``hydra`` node dropped, as in a job)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    container = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    assert isinstance(container, dict)
    return container


@functools.cache
def saved_config(overrides: tuple[str, ...]) -> str:
    """``.hydra/config.yaml`` as Hydra saves it for ``overrides``: the task config, unresolved."""
    return OmegaConf.to_yaml(compose_config(*overrides, return_hydra_config=False))


def write_run_dir(run_dir: Path, results: Results, *overrides: str) -> Path:
    """A run dir as ``approxtrain`` leaves it, without training: ``results.json`` written
    through the schema (so it holds only keys the trainer writes) and ``.hydra/`` with the
    config composed from the run's axes (model, dataset, sampler, ratio, seed, layers)
    plus ``overrides``."""
    axes = (f"model={results.model}", f"dataset={results.dataset}", f"sampler={results.sampler}",
            f"ratio={results.ratio}", f"seed={results.seed}", f"layers={results.layers_rule_set}")
    task_overrides = (*axes, *overrides)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "config.yaml").write_text(saved_config(task_overrides))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(task_overrides)))
    write_results(run_dir, results)
    return run_dir


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Factory: ``compose_cfg("model=wrn", ...)`` -> the composed DictConfig (with its ``hydra`` node)."""
    return compose_config


@pytest.fixture
def run_cfg() -> Callable[..., dict[str, Any]]:
    """Factory: a shrunk, resolved run config (1 epoch, CPU, logger off, no workers) plus ``overrides``."""

    def make(*overrides: str) -> dict[str, Any]:
        return to_run_config(compose_config(*FAST, *overrides))

    return make


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """The run's output dir (created by the run itself)."""
    return tmp_path / "run"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared real data at {SHARED_DATA}")
    return SHARED_DATA


def approxtrain_command() -> list[str]:
    """The installed console script (or the module with this interpreter when it is not on PATH)."""
    script = shutil.which("approxtrain")
    return [script] if script else [sys.executable, "-m", "approxtrain.cli.train"]


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Factory: run ``approxtrain *args`` in a subprocess (cwd = tmp_path, env += ``env``); returns the completed process."""

    def run(*args: str, env: dict[str, str | None] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        environment = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "WANDB_MODE")}
        environment["COLUMNS"] = "200"  # the sweep table unwrapped
        for key, value in (env or {}).items():  # None removes a variable
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        return subprocess.run([*approxtrain_command(), *args], cwd=cwd or tmp_path, env=environment,
                              capture_output=True, text=True, timeout=timeout)

    return run


def read_wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B run file (``run-*.wandb``: a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        chunk = data[position : position + length]
        position += length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


@pytest.fixture
def one_thread():
    """Many tiny products in a loop: one intra-op thread avoids OpenMP hand-off overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["scatter", "gather"])
def spread_path(request, monkeypatch):
    """Runs a test through both ways the linear backward spreads its sampled gradients to
    full size: zero-fill + scatter (small results) and product into a padded buffer +
    gather (large ones), whatever the test's tensor sizes."""
    import approxtrain._layout as layout

    monkeypatch.setattr(layout, "_SPREAD_GATHER_MIN_ELEMENTS", 0 if request.param == "gather" else 1 << 62)
    return request.param


@pytest.fixture(params=["row_major", "column_major"])
def weight_layout(request):
    """Runs a linear test with its weight leaf stored row-major (``nn.Linear``'s layout) and
    column-major (``ApproxLinear``'s); returns the function that lays a leaf out so."""

    def lay_out(weight: torch.Tensor) -> torch.Tensor:
        if request.param == "row_major":
            return weight
        return weight.detach().t().contiguous().t().requires_grad_(weight.requires_grad)

    return lay_out
