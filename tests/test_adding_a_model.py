"""docs/models.md's "Adding a model", done as written: a model file and its YAML, registered through
the registry alone, trained through the CLI; and the registry's checks on a spec."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from doc_sections import files_and_commands
from torch import nn

from approxtrain.data import DatasetInfo
from approxtrain.models import POSITIVE_INT, build_model, list_models, model_spec, register_model, registry
from approxtrain.run.schema import read_results

MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
DIGITS = DatasetInfo("digits", "image", in_channels=1, image_size=(8, 8), num_classes=10)
TEXT = DatasetInfo("synthetic", "text", vocab_size=50, metric="perplexity")
# A shrunk run, as the other CLI tests: one epoch of a few steps on the CPU, no loader workers.
SHRINK = ("trainer.epochs=1", "trainer.max_steps=3", "trainer.num_workers=0", "trainer.device=cpu")


def readme_section() -> tuple[dict[str, str], str]:
    """The files (path from each block's first-line comment -> text) and the command of the section."""
    files, commands = files_and_commands(MODELS_PAGE, "Adding a model")
    assert len(commands) == 1 and len(files) == 2, "the section shows one model file, one YAML and one command"
    return files, commands[0]


def write_readme_files(folder: Path) -> dict[str, str]:
    files, _ = readme_section()
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return files


@pytest.fixture
def isolated_registry(monkeypatch, tmp_path):
    """The registry and ``sys.modules`` as they were before the test; ``tmp_path`` on ``sys.path``."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("tiny", None)


def test_readme_model_trains_through_the_cli(cli, tmp_path):
    files = write_readme_files(tmp_path)
    _, command = readme_section()
    words = shlex.split(command)
    assert words[0].startswith("PYTHONPATH=") and words[1] == "approxtrain"
    python_path = words[0].partition("=")[2] + os.pathsep + os.environ.get("PYTHONPATH", "")
    run_dir = tmp_path / "run"
    process = cli(*words[2:], *SHRINK, f"hydra.run.dir={run_dir}", env={"PYTHONPATH": python_path})
    assert process.returncode == 0, process.stderr
    results = read_results(run_dir)
    assert results is not None and results["status"] == "finished"
    config = yaml.safe_load(files["myconf/model/tiny.yaml"])
    assert (results["model"], results["dataset"], results["layers_rule_set"]) == ("tiny", config["defaults"][0]["paper_dataset"], "paper")
    plan = {row["name"]: row for row in results["layers"]}
    assert plan["fc1"]["policy"] == "topk" and plan["fc1"]["n"] == 64 and plan["fc1"]["k"] == 32  # 8x8 digits, ratio 0.5
    assert plan["fc2"]["k"] == plan["fc2"]["n"] == 64  # model.width=64; no rule: exact
    assert 0 < results["compute_reduction"] < 1 and results["steps"] == 3


def test_readme_model_is_registered_by_its_module(isolated_registry, tmp_path):
    write_readme_files(tmp_path)
    assert "tiny" not in list_models()
    config = {"name": "tiny", "module": "tiny", "paper_dataset": "digits", "paper_rules": [{"match": "fc1"}], "width": 8}
    spec = model_spec(config)
    assert (spec.name, spec.kind, spec.options) == ("tiny", "image", {"width": 32})
    assert "tiny" in list_models()
    model = build_model(config, DIGITS)
    assert model.fc1.weight.shape == (8, 64) and model.fc2.weight.shape == (10, 8)
    with pytest.raises(ValueError, match=r"^model.width=0 is invalid; allowed: an integer >= 1$"):
        build_model({**config, "width": 0}, DIGITS)
    with pytest.raises(TypeError, match=r"unknown option 'depth' for model 'tiny'; allowed: width"):
        build_model({**config, "depth": 3}, DIGITS)
    with pytest.raises(ValueError, match=r"model 'tiny' needs an image dataset but 'synthetic' is a text dataset"):
        build_model(config, TEXT)


def test_a_module_that_cannot_be_imported_is_one_line(isolated_registry):
    with pytest.raises(ValueError) as error:
        model_spec({"name": "tiny", "module": "no_such_module"})
    assert str(error.value).startswith("model.module='no_such_module' cannot be imported") and "\n" not in str(error.value)


def _net(info, *, width: int = 4) -> nn.Module:
    return nn.Linear(width, info.num_classes)


@pytest.mark.parametrize(("kind", "checks", "error", "message"), [
    ("image", {}, TypeError, r"model 'toy': every keyword-only option of _net needs a default and a check; options width, checks none"),
    ("image", {"width": POSITIVE_INT, "depth": POSITIVE_INT}, TypeError, r"options width, checks width, depth"),
    ("video", {"width": POSITIVE_INT}, ValueError, r"model 'toy': kind='video' is invalid; allowed: image, text"),
])
def test_register_model_rejects_a_spec_that_cannot_work(kind, checks, error, message, isolated_registry):
    with pytest.raises(error, match=message):
        register_model("toy", kind=kind, checks=checks)(_net)
    assert "toy" not in list_models()


def test_an_option_without_default_and_a_taken_name_are_rejected(isolated_registry):
    def no_default(info, *, width: int) -> nn.Module:
        return nn.Linear(width, info.num_classes)

    with pytest.raises(TypeError, match="needs a default and a check"):
        register_model("toy", kind="image", checks={"width": POSITIVE_INT})(no_default)
    with pytest.raises(ValueError, match=r"model 'mlp' is already registered by approxtrain.models.mlp.mlp"):
        register_model("mlp", kind="image", checks={"width": POSITIVE_INT})(_net)
    assert model_spec({"name": "mlp"}).builder.__module__ == "approxtrain.models.mlp"
