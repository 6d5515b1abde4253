"""README.md's code blocks, run as a reader would run them, so the README cannot drift from the program.

Read generically from the fenced blocks (whatever the README says today):

* a block whose first line names a file (``# tiny.py``, ``# myconf/model/tiny.yaml``) is written to
  that path in the work dir, where the commands run, in README order (one dir for the whole file,
  seeded with a finished two-run sweep for ``approxtrain-compare`` to read);
* ``bash`` blocks: every command runs in a subprocess, shortened by :data:`SHORTEN` (and sweeps
  by :func:`shortened_sweep`); it must exit 0 without a traceback -- or, where it needs what is not
  here (a dataset download, a SLURM cluster, a W&B server), end with one line matching
  :data:`OFFLINE` and a non-zero exit. Commands matching :data:`NOT_RUN` are skipped with its reason;
* ``python`` blocks run; a name the block leaves to the reader (``MyNet``, ``cfg``) skips the rest,
  after its imports have run; ``yaml`` blocks must parse.

A block that runs more than one command is marked slow; one that uses an optional extra's option
(``hydra/launcher=joblib``, ``search=...``) carries ``extra(NAME)``.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from approxtrain.extras import EXTRAS
from approxtrain.run.schema import FINISHED, Results
from conftest import SHARED_DATA, approxtrain_command, compose_config, write_run_dir

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "README.md"
# What shortens every approxtrain command (appended, so it wins over the command's own values).
SHORTEN = ("trainer.max_steps=2", "logger=none")
# Optuna searches: this many trials.
SEARCH_TRIALS = 2
# Real data the commands read from here (dataset name -> overrides), where ../shared/data has it.
LOCAL_DATA = {"mnist": (f"dataset.root={SHARED_DATA}",),
              "ptb": (f"dataset.root={SHARED_DATA / 'PTB'}", "dataset.train_split=valid")}
# Commands not run (a regular expression on the command line), and why.
NOT_RUN = {
    r"^pip install\b": "installs packages: CI's first stages run the README's installs",
    r"^python -m pytest\b": "the test suite itself",
    r"^torchrun\b.*--nnodes=(?!1\b)": "needs several nodes (tests/test_distributed.py runs torchrun on one)",
    r"^wandb sync\b": "uploads to a W&B server",
}
# The one line a command that needs what is not here ends with (and a non-zero exit).
OFFLINE = {
    "a dataset download": r"^approxtrain: error: dataset '\w+' not found under dataset\.root=.* cannot be downloaded \(offline\?\)",
    "a SLURM cluster": r"^approxtrain: error: hydra/launcher=submitit_slurm needs a SLURM cluster",
    "a W&B server": r"^approxtrain-compare: error: cannot read W&B project .*\(offline or not logged in\?\)",
}
FILE_HEADER = re.compile(r"#\s*([\w./-]+\.(?:py|yaml|yml))\s*$")
PLACEHOLDER = re.compile(r"<[^<>]+>")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence

    @property
    def file(self) -> str | None:
        """The path a file block is saved to (its first line, ``# tiny.py``), else None."""
        first = self.text.splitlines()[0] if self.text else ""
        found = FILE_HEADER.fullmatch(first.strip())
        return found.group(1) if found and self.language in ("python", "yaml") else None


def read_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(found.group(1), found.group(2), text[: found.start()].count("\n") + 1)
            for found in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M)]


def commands(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comment lines and trailing comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    joined = PLACEHOLDER.sub(lambda found: found.group(0).replace(" ", "_"), joined)  # <each sweep dir>: one word
    return [shlex.join(words) for words in (shlex.split(line, comments=True) for line in joined.splitlines()) if words]


def not_run(command: str) -> str | None:
    return next((reason for pattern, reason in NOT_RUN.items() if re.search(pattern, command)), None)


def extras_used(command: str) -> list[str]:
    """The extras whose Hydra options the command chooses (``hydra/launcher=joblib`` -> joblib) or whose
    modules its ``_target_``s name (``model._target_=timm.create_model`` -> models)."""
    chosen = {f"{key}/{value}" for key, _, value in (word.partition("=") for word in command.split()) if value}
    chosen |= {"hydra/sweeper/optuna" for word in command.split() if word.startswith("search=")}
    targets = {value.split(".")[0] for key, _, value in (word.partition("=") for word in command.split()) if key.endswith("_target_")}
    return [name for name, extra in EXTRAS.items()
            if any(option.startswith(pattern.rstrip("*")) if pattern.endswith("*") else option == pattern
                   for pattern in extra.options for option in chosen) or targets & set(extra.modules)]


def cases() -> list:
    params = []
    for block in read_blocks(DOCUMENT):
        if block.file or block.language not in ("bash", "sh", "python", "yaml"):
            continue
        runs = [command for command in commands(block) if not not_run(command)] if block.language in ("bash", "sh") else []
        marks = [pytest.mark.extra(name) for name in sorted({extra for command in runs for extra in extras_used(command)})]
        if len(runs) > 1:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, marks=marks, id=f"{DOCUMENT.name}:{block.line}"))
    return params


# ---------------------------------------------------------------------------------------------- the work dir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The reader's dir: the README's files written, and a finished sweep (mlp/digits, exact vs topk)."""
    root = tmp_path_factory.mktemp("reader")
    for block in read_blocks(DOCUMENT):
        if block.file:
            (root / block.file).parent.mkdir(parents=True, exist_ok=True)
            (root / block.file).write_text(block.text)
    sweep = root / "outputs" / "multiruns" / "2000-01-01_00-00-00"
    for job, (sampler, best, reduction) in enumerate((("exact", 0.95, 0.0), ("topk", 0.93, 0.5))):
        results = Results(model="mlp", dataset="digits", sampler=sampler, ratio=0.5, seed=0, layers_rule_set="paper",
                          metric_name="accuracy", status=FINISHED, best_metric=best, final_metric=best,
                          compute_reduction=reduction)
        write_run_dir(sweep / str(job), results, "logger=none")
    return root


def latest(folder: Path) -> Path:
    dirs = sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
    return dirs[-1] if dirs else folder


def concrete(word: str, workdir: Path) -> str:
    """A placeholder made concrete: a run or sweep dir that is not here -> the latest one; ``key=<x>`` -> ``key=x``."""
    for kind in ("outputs/multiruns/", "outputs/runs/"):
        if word.startswith(kind) and not (workdir / word).exists():
            return str(latest(workdir / kind).relative_to(workdir))
    return PLACEHOLDER.sub(lambda found: re.sub(r"\W+", "_", found.group(0)[1:-1]).strip("_"), word)


def shortened_sweep(overrides: list[str]) -> list[str]:
    """A sweep cut to two jobs: the first swept key keeps two values, every other one its first;
    a config's own sweep (``hydra.sweeper.params``) keeps its first values; an Optuna search runs
    :data:`SEARCH_TRIALS` trials."""
    kept, first = [], True
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value and not re.search(r"[\[\]{}()'\"$]", value) and "/" not in key:
            values = value.split(",")
            override = f"{key}={','.join(values[:2] if first else values[:1])}"
            first = False
        kept.append(override)
    one_job = [override.split(",")[0] if "," in override and "/" not in override.partition("=")[0] else override for override in kept]
    try:
        hydra_cfg = compose_config(*[o for o in one_job if not o.startswith("hydra/")], return_hydra_config=True).hydra
    except Exception:  # noqa: BLE001 - e.g. an option from --config-dir: no config sweep to cut
        return kept
    params = hydra_cfg.sweeper.get("params") or {}
    cut = [f"hydra.sweeper.params.{key}={str(value).split(',')[0]}" for key, value in params.items() if "(" not in str(value)]
    if "n_trials" in hydra_cfg.sweeper or any(o.startswith("search=") for o in kept):
        cut.append(f"hydra.sweeper.n_trials={SEARCH_TRIALS}")
    return [*kept, *cut]


def local_data(overrides: list[str]) -> list[str]:
    """The overrides that read the command's dataset from the real data here (MNIST, PTB), if any."""
    single = [o.split(",")[0] for o in overrides if not o.startswith("hydra")]
    try:
        name = compose_config(*single, return_hydra_config=False).dataset.name
    except Exception:  # noqa: BLE001 - e.g. --config-dir: the command's own dataset
        return []
    return list(LOCAL_DATA.get(name, ())) if SHARED_DATA.is_dir() else []


def prepared(command: str, workdir: Path) -> tuple[list[str], dict[str, str], str | None]:
    """The command's argv (shortened), its environment additions and the file its stdout goes to."""
    words = [concrete(word, workdir) for word in shlex.split(command) if word != "..."]
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    stdout_file = None
    if ">" in words:
        stdout_file = words[words.index(">") + 1]
        words = words[: words.index(">")]
    program, args = words[0], words[1:]
    if program == "approxtrain":
        flags, overrides = split_flags(args)
        if "-m" in flags or "--multirun" in flags:
            overrides = shortened_sweep(overrides)
        return [*approxtrain_command(), *flags, *overrides, *local_data(overrides), *SHORTEN], env, stdout_file
    if program == "approxtrain-compare":
        script = shutil.which("approxtrain-compare")
        return [*([script] if script else [sys.executable, "-m", "approxtrain.cli.compare"]), *args], env, stdout_file
    return words, env, stdout_file


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """An approxtrain command line's flags (with their values: ``--config-dir myconf``) and its overrides."""
    flags, overrides, takes_value = [], [], False
    for arg in args:
        if takes_value or arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
        else:
            overrides.append(arg)
    return flags, overrides


def run(command: str, workdir: Path, line: int) -> None:
    argv, extra_env, stdout_file = prepared(command, workdir)
    env = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "WANDB_MODE", "WANDB_API_KEY")}
    env.update(extra_env, COLUMNS="200", WANDB_MODE="offline")
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if stdout_file:
        (workdir / stdout_file).write_text(done.stdout)
    shown = f"README.md:{line}: `{command}`\nran: {shlex.join(argv)}\n--- stderr (tail):\n{done.stderr[-2500:]}"
    assert "Traceback" not in done.stdout + done.stderr, shown
    if done.returncode == 0:
        return
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if "extra: pip install" in last:
        pytest.skip(f"README.md:{line}: {last}")
    needs = [what for what, pattern in OFFLINE.items() if re.match(pattern, last)]
    assert needs, f"exit {done.returncode}, and the last line says no missing download, cluster or server\n{shown}"


# ---------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("block", cases())
def test_readme_block(block: Block, workdir: Path, monkeypatch) -> None:
    if block.language == "yaml":
        assert yaml.safe_load(block.text) is not None, f"README.md:{block.line}: an empty YAML block"
        return
    if block.language == "python":
        run_python(block, workdir, monkeypatch)
        return
    skipped = []
    for command in commands(block):
        if (reason := not_run(command)) is not None:
            skipped.append(f"`{command}`: {reason}")
            continue
        run(command, workdir, block.line)
    if skipped and len(skipped) == len(commands(block)):
        pytest.skip(f"README.md:{block.line}: not run: " + "; ".join(skipped))


def run_python(block: Block, workdir: Path, monkeypatch) -> None:
    """The block's imports, then the block; a name it uses but never binds is the reader's (a skip)."""
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    tree = ast.parse(block.text, filename=f"README.md:{block.line}")
    imports = ast.Module([node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))], type_ignores=[])
    namespace: dict = {"__name__": "readme_block"}
    exec(compile(imports, f"README.md:{block.line}", "exec"), namespace)
    bound = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    try:
        exec(compile(tree, f"README.md:{block.line}", "exec"), namespace)
    except NameError as error:
        if error.name in bound or hasattr(builtins, str(error.name)):
            raise
        pytest.skip(f"README.md:{block.line}: its imports run; the rest uses {error.name}, which it leaves to the reader")


def test_commands_are_read_as_a_reader_types_them():
    block = Block("bash", "# a comment\napproxtrain -m a=1,2,3 \\\n    b=x,y  # trailing\npip install -e \".[dev]\"\n"
                          "ls outputs/<each sweep dir>\n", 1)
    assert commands(block) == ["approxtrain -m a=1,2,3 b=x,y", "pip install -e '.[dev]'", "ls 'outputs/<each_sweep_dir>'"]
    assert not_run(commands(block)[1]) and not not_run(commands(block)[0])
    assert shortened_sweep(["model=mlp", "sampler=exact,topk,nps", "ratio=0.3,0.5"])[:3] == ["model=mlp", "sampler=exact,topk", "ratio=0.3"]
    assert extras_used("approxtrain -m hydra/launcher=submitit_slurm model=mlp") == ["slurm"]


def test_a_drifted_command_fails_naming_its_block(workdir):
    with pytest.raises(AssertionError, match=r"(?s)exit 2, .*README\.md:7: `approxtrain model=mlp dataset=digits trainer\.epoch=1`"):
        run("approxtrain model=mlp dataset=digits trainer.epoch=1", workdir, 7)
