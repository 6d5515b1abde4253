"""Stopping a sweep: a SIGTERM/SIGINT to the process that launched it (``approxtrain -m``).

The launching process notes the signal, leaves a stop marker in the sweep dir (a job that has not
started yet sees it and does not start), and sends SIGTERM to every running job: the processes that
hold a job dir of the sweep (``.lock``), whatever launcher started them (joblib's loky workers,
submitit's local jobs). SIGTERM, not the signal itself: a Ctrl-C in a terminal reaches the jobs
already, and a second SIGINT would stop them at once. Each job stops at its next step boundary with
a checkpoint and records ``interrupted``; the launcher returns, the sweep's summary is printed and
the process exits ``128 + N``. A second signal is sent on as it is (a second SIGINT stops the jobs
at once). Should the jobs not end within :data:`GRACE_S`, they are killed, the summary is printed
and the process exits all the same.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from approxtrain.run.rundir import holder

STOP_MARKER = ".stop"  # in the sweep dir while a stop is under way
GRACE_S = 120.0  # how long the jobs have to checkpoint and return after the first signal
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_requested(sweep_dir: Path | str) -> bool:
    """Whether the sweep in ``sweep_dir`` is being stopped (a job that has not started must not start)."""
    return (Path(sweep_dir) / STOP_MARKER).exists()


def running_jobs(sweep_dir: Path) -> list[int]:
    """The pids of the live processes (other than this one) that hold a job dir of the sweep."""
    pids = []
    for lock in sweep_dir.glob("*/.lock"):
        pid = holder(lock.parent)
        if pid is not None and pid.isdigit() and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def shut_down_loky_workers() -> None:
    """End joblib's reusable loky workers now (they would idle on for minutes after the sweep)."""
    module = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(module, "_executor", None)
    if executor is None:
        return
    if hasattr(executor, "terminate"):  # joblib's memmapping executor: also removes its temp folder
        executor.terminate(kill_workers=True)
    else:
        executor.shutdown(wait=True, kill_workers=True)


class SweepStop:
    """The launching process's SIGTERM/SIGINT handlers for the life of a sweep (see the module)."""

    def __init__(self, sweep_dir: Path, give_up: Callable[[int], None]) -> None:
        self.sweep_dir = sweep_dir
        self.give_up = give_up  # called (in a thread) with the signal number when the jobs outlast GRACE_S
        self.signal_number: int | None = None
        self.ended = threading.Event()
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        (self.sweep_dir / STOP_MARKER).unlink(missing_ok=True)  # left by a launching process that was killed
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in STOPPING_SIGNALS}

    def restore(self) -> None:
        self.ended.set()
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        (self.sweep_dir / STOP_MARKER).unlink(missing_ok=True)

    def handle(self, signal_number: int, frame: Any) -> None:
        first = self.signal_number is None
        if first:
            self.signal_number = signal_number
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            (self.sweep_dir / STOP_MARKER).write_text(f"{signal.Signals(signal_number).name} {time.time():.0f}\n")
            print(f"approxtrain: {signal.Signals(signal_number).name}: stopping the sweep's jobs at their next step "
                  f"(up to {GRACE_S:.0f} s)", file=sys.stderr, flush=True)
            threading.Thread(target=self._deadline, daemon=True).start()
        self.forward(signal.SIGTERM if first else signal_number)

    def forward(self, signal_number: int) -> None:
        for pid in running_jobs(self.sweep_dir):
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                pass

    def _deadline(self) -> None:
        if self.ended.wait(GRACE_S):
            return
        self.forward(signal.SIGKILL)
        assert self.signal_number is not None
        self.give_up(self.signal_number)
