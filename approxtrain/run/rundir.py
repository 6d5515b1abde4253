"""A run's dir: claimed and held by one live run, written atomically (``results.json``, checkpoints).

A new run claims a dir no other run has (:func:`claim_new_dir`: an atomic ``mkdir``, with
a ``_1``, ``_2``, ... suffix on a name already taken) and holds it for its life
(:func:`hold`: ``fcntl.flock`` on ``<dir>/.lock``, released when the process ends), so a
second process aimed at it is refused (:func:`holder` names it); a dir that cannot be
created or written in is refused in one line naming it. A file is written to a
temporary sibling and moved into place with ``os.replace``, so a killed run never leaves
a half-written file behind (checkpoints: :mod:`approxtrain.run.checkpoint`).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any

from approxtrain.run.schema import RESULTS_FILE, Results, results_path, results_text

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"
LOCK_FILE = ".lock"
_held: dict[Path, IO[str]] = {}  # the run dirs this process holds: their open, locked .lock files


class RunDirHeld(ValueError):
    """Another live process holds the run dir."""


def not_writable(run_dir: Path | str, error: OSError) -> ValueError:
    """The one-line error for a run dir this process cannot create or write in."""
    # mkdir(exist_ok=True) says "File exists" for a file where a dir must be
    reason = "Not a directory" if isinstance(error, FileExistsError) else error.strerror or type(error).__name__
    where = f": {str(error.filename)!r}" if error.filename is not None and str(error.filename) != str(run_dir) else ""
    return ValueError(f"run dir {str(run_dir)!r} is not writable ({reason}{where}); "
                      "allowed: a dir this user can create and write in")


def hold(run_dir: Path | str) -> bool:
    """Hold ``run_dir`` (created if missing) for this process; True if newly taken, False if this
    process held it already. :class:`RunDirHeld` (one line, naming the holder) if another process
    does; ``ValueError`` (one line, naming the dir) if it cannot be created or written in."""
    path = Path(run_dir).resolve()
    if path in _held:
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "a+")
    except OSError as error:
        raise not_writable(run_dir, error) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise RunDirHeld(f"{str(run_dir)!r} is held by a live run (pid {pid})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _held[path] = handle
    remove_orphans(path)
    return True


# where a run writes its files through atomic_write (the report folder is compare's, written unheld)
_WRITTEN_DIRS = (".", CHECKPOINT_DIR, ".hydra")


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<8 hex>.tmp``) a process killed mid-write left in the run
    dir this process has just taken: no live process writes there. Returns them."""
    orphans = [path for folder in _WRITTEN_DIRS for path in (run_dir / folder).glob(".*.tmp")
               if _TEMPORARY.fullmatch(path.name)]
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def release(run_dir: Path | str) -> None:
    """Let go of a run dir this process holds (the lock also ends with the process)."""
    handle = _held.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def holder(run_dir: Path | str) -> str | None:
    """The pid of the live process (this one included) holding ``run_dir``, else None; creates nothing."""
    path = Path(run_dir).resolve()
    if path in _held:
        return str(os.getpid())
    try:
        handle = open(path / LOCK_FILE)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "?"
    return None


def claim_new_dir(path: Path | str) -> str:
    """Create and hold a dir no run has: ``path``, or ``path_1``, ``path_2``, ... when taken
    (``os.mkdir`` is atomic: two processes never get the same one); returns it."""
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise not_writable(base, error) from None
    for number in itertools.count():
        candidate = base if number == 0 else base.with_name(f"{base.name}_{number}")
        try:
            candidate.mkdir()
        except FileExistsError:  # taken
            continue
        except OSError as error:
            raise not_writable(candidate, error) from None
        try:
            hold(candidate)
        except RunDirHeld:  # held by a process that just aimed at it
            continue
        return str(candidate)
    raise AssertionError("unreachable")


def recorded_run(run_dir: Path | str) -> Path | None:
    """A file showing that ``run_dir`` (or a job dir of it, for a sweep dir) holds a run --
    its ``results.json`` or a checkpoint -- else None."""
    path = Path(run_dir)
    for pattern in (RESULTS_FILE, f"{CHECKPOINT_DIR}/*.pt", f"*/{RESULTS_FILE}", f"*/{CHECKPOINT_DIR}/*.pt"):
        found = next(iter(sorted(path.glob(pattern))), None)
        if found is not None:
            return found
    return None


def claim(run_dir: Path | str, key: str, *, continues: bool = False) -> None:
    """Hold the resolved dir ``run_dir`` (the value of ``key``) for this process, refusing in one line
    (``ValueError``, nothing written) a dir another live run holds or one that holds a run -- unless
    ``continues`` (this run's own ``resume=``, a requeued job) or this process claimed it already."""
    path = Path(run_dir).resolve()
    pid = holder(path)
    if pid is not None and pid != str(os.getpid()):
        raise RunDirHeld(f"{key}={path}: the dir is held by a live run (pid {pid}); allowed: a dir no live run holds")
    if pid is None and not continues and (found := recorded_run(path)) is not None:
        raise ValueError(f"{key}={path}: the dir already holds a run ({found}); allowed: a new or empty dir, "
                         "or resume=<run dir> to continue a run")
    hold(path)


def checkpoint_path(run_dir: Path | str, name: str = LAST_CHECKPOINT) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / name


# The mode of the files a run writes (results.json, checkpoints): readable by the group and
# others, less what the umask takes away (``tempfile.mkstemp`` would make them 0600).
FILE_MODE = 0o644


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # what _new_temporary names


def _new_temporary(path: Path) -> tuple[int, str]:
    """A new file next to ``path`` (a hidden ``.tmp`` sibling), created with :data:`FILE_MODE` less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {str(path)!r}")


class _Writes:
    """A binary file that remembers the first ``OSError`` its writes met (torch.save turns it into
    ``RuntimeError: ... unexpected pos``, which names neither the file nor the cause)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def atomic_write(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary sibling of ``path``, then move it into place. A write that
    fails (a full disk, a file-size limit) raises ``OSError`` naming ``path`` and the cause."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    handle = None
    try:
        with os.fdopen(fd, "wb") as raw:
            handle = _Writes(raw)
            write(handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = handle.error if handle is not None and handle.error is not None else error
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}") from None
        raise


def write_results(run_dir: Path | str, results: Results | dict[str, Any]) -> Path:
    """Write ``results`` as ``run_dir/results.json`` atomically; returns the path."""
    path = results_path(run_dir)
    text = results_text(results)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path
