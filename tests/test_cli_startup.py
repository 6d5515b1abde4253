"""The commands that train nothing -- ``--help``, ``--cfg``, shell completion -- never import torch.

Importing torch (and ``torch._dynamo``) takes seconds; a TAB or ``--help`` should not wait for
it. Each case runs the console entry point in a fresh interpreter and reports, after the
command, whether ``torch`` is in ``sys.modules``. How long the commands take is measured by
``scripts/cli_startup.py``, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MARK = "torch imported:"
DRIVER = f"""
import sys
import approxtrain.cli.config_store
from approxtrain.cli.train import entry
sys.argv = ["approxtrain", *sys.argv[1:]]
try:
    entry()
finally:
    print("{MARK}", "torch" in sys.modules, file=sys.stderr)
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "COMP_LINE")}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def torch_imported(done: subprocess.CompletedProcess) -> bool:
    marks = [line for line in done.stderr.splitlines() if line.startswith(MARK)]
    assert marks, done.stderr[-3000:]
    return marks[-1].split()[-1] == "True"


def test_importing_the_cli_and_the_config_store_imports_no_torch():
    code = "import sys, approxtrain, approxtrain.cli.config_store, approxtrain.cli.train; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--help"], "sampler: bernoulli, exact, nps"),
        (["--cfg", "job"], "name: topk"),
        (["model=wrn", "sampler=nps", "ratio=0.3", "--cfg", "job"], "widen_factor"),
        (["--cfg", "hydra"], "run:"),
    ],
)
def test_help_and_cfg_import_no_torch(args, shown):
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert shown in done.stdout
    assert not torch_imported(done)


@pytest.mark.parametrize(
    ("line", "offered"),
    [
        ("approxtrain sampler=", "sampler=topk"),
        ("approxtrain model=wrn trainer.ep", "trainer.epochs="),
        ("approxtrain ", "sampler="),
    ],
)
def test_shell_completion_imports_no_torch(line, offered):
    done = run_cli("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert done.returncode == 0, done.stderr[-3000:]
    assert offered in done.stdout.split()
    assert not torch_imported(done)


def test_a_bad_override_is_refused_without_torch():
    done = run_cli("sampler=nope", "--cfg", "job")
    assert done.returncode == 2
    assert "approxtrain: error: sampler=nope is unknown" in done.stderr
    assert not torch_imported(done)
