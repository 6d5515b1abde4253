"""What a run writes into its run dir, written atomically: ``results.json`` and checkpoints.

A file is written to a temporary sibling and moved into place with ``os.replace``, so
a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from approxtrain.run.schema import Results, results_path, results_text

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"


def checkpoint_path(run_dir: Path | str, name: str = LAST_CHECKPOINT) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / name


def atomic_write(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary sibling of ``path``, then move it into place."""
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


def write_results(run_dir: Path | str, results: Results | dict[str, Any]) -> Path:
    """Write ``results`` as ``run_dir/results.json`` atomically; returns the path."""
    path = results_path(run_dir)
    text = results_text(results)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU; the caller moves them)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"resume: no checkpoint at {str(path)!r}; allowed: a run dir with checkpoints/last.pt")
    # Our own file: it also holds numpy/python RNG states, which weights_only rejects.
    return torch.load(path, map_location="cpu", weights_only=False)
