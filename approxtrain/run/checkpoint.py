"""Checkpoint files: written atomically, read back only as tensors and plain data, verified first.

A checkpoint (``checkpoints/last.pt``, ``best.pt``) is a torch zip archive holding tensors
and plain data only -- numbers, strings, lists, dicts; the numpy and Python RNG states are
stored as tensors (:func:`approxtrain.run.state.rng_state`) -- so it is read with ``torch.load(weights_only=True)``
and nothing in a run dir can run code when a run is resumed or requeued. Before it is read,
every record's CRC-32 (which the zip format keeps next to the data) is checked, so flipped
bytes anywhere in the tensor data are found. Either failure is one line naming the file.

``last.pt`` is written before ``best.pt``: a crash between the two leaves ``best.pt`` one
epoch behind the best epoch ``last.pt`` records, and :func:`repair_best` (at resume) writes
it again from ``last.pt``.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

from approxtrain.run.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, atomic_write, checkpoint_path

log = logging.getLogger("approxtrain")
# "format" in a checkpoint: 2 = plain data only (read with weights_only=True), RNG states as tensors.
# Format 1 (no key) pickled numpy's RNG state and can only be read by running pickle's code.
FORMAT = 2


def save_checkpoint(path: Path | str, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically (with this module's :data:`FORMAT`)."""
    import torch  # here, not at the top: the CLI checks a resume's checkpoint without importing torch

    atomic_write(Path(path), lambda handle: torch.save({**checkpoint, "format": FORMAT}, handle))


def _refused(path: Path, reason: str) -> ValueError:
    return ValueError(f"resume: {str(path)!r} is not a readable checkpoint ({reason})")


def check_checkpoint(path: Path | str) -> None:
    """A cheap look at a checkpoint before anything is built: ``ValueError`` (one line naming the
    file) when it is missing, empty or not a torch zip archive; :func:`load_checkpoint` reads it in full."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {str(path)!r}; allowed: a run dir with checkpoints/last.pt")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise _refused(path, "an empty file" if path.stat().st_size == 0 else "not a torch zip archive")


def verify_checkpoint(path: Path | str) -> None:
    """Check every record of the archive against the CRC-32 stored with it: ``ValueError`` (one line
    naming the file and the damaged record) when any differs -- a damaged file is never trained on."""
    path = Path(path)
    check_checkpoint(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _refused(path, f"a damaged zip archive: {error}") from None
    if damaged is not None:
        raise _refused(path, f"corrupt: the record {damaged} does not match its checksum")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU; the caller moves them),
    after :func:`verify_checkpoint`; only tensors and plain data are unpickled (``weights_only``):
    anything more is refused in one line, naming the file."""
    import torch

    path = Path(path)
    verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a type outside weights_only's allow-list
        needs = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        raise _refused(path, "it needs more than tensors and plain data to be read, which could run code it carries"
                             f"{'; ' + needs if needs else ''}; a checkpoint of an approxtrain before checkpoint "
                             "format 2 cannot be resumed") from None
    except Exception as error:  # noqa: BLE001 - a damaged file: one line naming it
        raise _refused(path, (str(error).strip().splitlines() or [type(error).__name__])[0]) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise _refused(path, f"not an approxtrain checkpoint of format {FORMAT}")
    return checkpoint


def repair_best(run_dir: Path | str, state: dict[str, Any]) -> None:
    """Make ``best.pt`` hold the best epoch that ``last.pt``'s ``state`` records: when ``last.pt``
    is itself that epoch's checkpoint (a crash came between the two writes), copy it over ``best.pt``;
    otherwise a disagreement is said in a warning (nothing can rebuild an earlier epoch)."""
    best_epoch = state.get("best_epoch")
    best, last = checkpoint_path(run_dir, BEST_CHECKPOINT), checkpoint_path(run_dir, LAST_CHECKPOINT)
    if best_epoch is None:
        return
    try:
        recorded = load_checkpoint(best)["state"].get("epoch") if best.is_file() else None
    except ValueError:
        recorded = None
    if recorded == best_epoch:
        return
    if best_epoch == state["epoch"] and state.get("progress") is None:
        with last.open("rb") as source:
            atomic_write(best, lambda handle: shutil.copyfileobj(source, handle))
        log.warning("%s held epoch %s, not the best epoch %s: written again from %s", best, recorded, best_epoch, last)
    else:
        log.warning("%s holds epoch %s, not the best epoch %s that %s records", best, recorded, best_epoch, last)
