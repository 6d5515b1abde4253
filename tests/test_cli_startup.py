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


def test_help_is_the_help_hydra_renders(tmp_path):
    """The quick ``--help`` prints what Hydra's own ``--help`` prints (forced here by a ``hydra.*``
    override, which the quick one leaves to Hydra), a ``--config-dir``'s groups included."""
    extra = tmp_path / "configs" / "sampler"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("defaults:\n  - /sampler_fields@_here_\nname: topk\n")
    (tmp_path / "configs" / "extras" / "deep").mkdir(parents=True)
    (tmp_path / "configs" / "extras" / "deep" / "one.yaml").write_text("a: 1\n")
    for flags in ([], ["--config-dir", str(tmp_path / "configs")]):
        quick, hydra = run_cli("--help", *flags), run_cli("--help", *flags, "hydra.job.name=help")
        assert quick.returncode == hydra.returncode == 0, quick.stderr[-3000:] + hydra.stderr[-3000:]
        assert quick.stdout == hydra.stdout
        assert not torch_imported(quick)
    assert "sampler: bernoulli, exact, mine, nps" in quick.stdout
    assert "extras/deep: one" in quick.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model=wrn", "ratio=0.3"],
        ["-m", "sampler=topk,nps", "ratio=0.3,0.5"],
        ["--cfg", "job", "model=cnn", "--resolve"],
        ["-c", "hydra", "-p", "hydra.run"],
        ["--config-dir", "/tmp/x", "-cn", "other", "sampler=nps"],
        ["-cd=/tmp/y", "--config-path", "/tmp/z", "seed=1"],
        ["--help", "model=wrn"],
        ["-h"],
        ["--hydra-help"],
        ["--info"],
        ["--info", "defaults"],
        ["-sc", "install=bash"],
        ["--version"],
        ["--cfg", "nope"],
        ["--bogus"],
        ["a=1", "--cfg", "job", "b=2"],
        ["--experimental-rerun", "x.pickle"],
    ],
)
def test_the_command_line_is_read_as_hydra_reads_it(args):
    """:func:`read_command_line` against Hydra's own parser (an internal module, read only here, to
    catch a Hydra release that changes its flags)."""
    from hydra._internal.utils import get_args_parser

    from approxtrain.cli.command_line import read_command_line

    ours = read_command_line(args)
    try:
        hydras = get_args_parser().parse_args(args)
    except SystemExit:  # a usage error (or --version): Hydra reports it, we compose nothing
        assert ours is None
        return
    if hydras.hydra_help or hydras.info or hydras.shell_completion or hydras.experimental_rerun:
        assert ours is None
        return
    assert ours is not None
    assert (list(ours.overrides), ours.multirun, ours.cfg, ours.help, ours.config_dir, ours.config_path, ours.config_name) == (
        hydras.overrides, hydras.multirun, hydras.cfg, hydras.help, hydras.config_dir, hydras.config_path, hydras.config_name)
