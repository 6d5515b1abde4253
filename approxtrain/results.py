"""Run outputs written atomically: ``results.json`` and checkpoints.

A file is written to a temporary sibling and moved into place with
``os.replace``, so a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS_FILE = "results.json"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged metric is recorded as null
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results`` as ``run_dir/results.json`` atomically; returns the path."""
    path = Path(run_dir) / RESULTS_FILE
    text = json.dumps(_json_safe(results), indent=2)
    _atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def read_results(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU; the caller moves them)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"resume: no checkpoint at {str(path)!r}; allowed: a run dir with checkpoints/last.pt")
    # Our own file: it also holds numpy/python RNG states, which weights_only rejects.
    return torch.load(path, map_location="cpu", weights_only=False)
