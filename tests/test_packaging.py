"""A plain (non-editable) install ships the Hydra configs inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_ships_the_configs(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(ROOT), "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target)], check=True, capture_output=True, timeout=600)
    assert (target / "approxtrain" / "configs" / "model" / "wrn.yaml").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-m", "approxtrain.cli.train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    samplers = ", ".join(sorted(path.stem for path in (ROOT / "configs" / "sampler").glob("*.yaml")))
    assert f"sampler: {samplers}" in done.stdout and "topk_backward" in samplers
    composed = subprocess.run([sys.executable, "-m", "approxtrain.cli.train", "model=wrn", "--cfg", "job"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
    assert composed.returncode == 0, composed.stderr
    assert "name: cifar100" in composed.stdout
