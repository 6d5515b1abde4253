"""Stopping a run at a step boundary: the signals noted while it trains and the ranks' vote on them.

Lightning's preemption model: note the signal, finish the current step, checkpoint, record the
status, exit; SLURM requeues and ``resume=`` continues.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from approxtrain.run.distributed import Distributed

# The signals that stop a run at the next step boundary: Ctrl-C, what SLURM sends before it kills
# a job, and submitit's preemption warning (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise).
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


@dataclass
class StopRequests:
    """The stop signals received while a run trains (truthy once there is one), and the handlers
    they replaced: a launcher's own (submitit requeues the job on SIGUSR2) runs after the checkpoint."""

    signals: list[int] = field(default_factory=list)
    previous: dict[int, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.signals)

    def agreed(self, dist: Distributed, logging_step: bool = True) -> bool:
        """Whether the run stops now: on one process at any step; several ranks vote (a collective
        and a host sync) at logging steps only, so that every rank stops at the same step."""
        if dist.world_size > 1 and not logging_step:
            return False
        return dist.any(bool(self))

    @property
    def signal_number(self) -> int:
        """The first signal noted here (SIGTERM when only another rank had one)."""
        return self.signals[0] if self.signals else signal.SIGTERM

    def hand_over(self, signal_number: int) -> None:
        """Call the handler this signal had before the run (when it was a Python function other than
        Python's own SIGINT handler, whose KeyboardInterrupt would read as a second Ctrl-C)."""
        handler = self.previous.get(signal_number)
        if isinstance(outer := getattr(handler, "stop_requests", None), StopRequests):
            outer.hand_over(signal_number)  # an enclosing stop_signals noted it already: its own previous handler
        elif callable(handler) and handler is not signal.default_int_handler:
            handler(signal_number, None)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequests]:
    """While inside, the :data:`STOP_SIGNALS` are noted instead of killing the process; the trainer
    stops at the next step boundary. A second SIGINT stops at once (``KeyboardInterrupt``), like a
    kill: ``results.json`` and the checkpoints keep the last completed epoch. Outside the main
    thread nothing is installed. Inside another ``stop_signals`` (a sweep's job guards its whole
    life, the trainer its training) the signals the enclosing one noted count here too."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def note(signal_number: int, frame: Any) -> None:
        if requests and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        requests.signals.append(signal_number)

    note.stop_requests = requests  # type: ignore[attr-defined]
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    requests.previous = {number: signal.signal(number, note) for number in numbers}
    for handler in requests.previous.values():
        if isinstance(outer := getattr(handler, "stop_requests", None), StopRequests):
            requests.signals.extend(number for number in outer.signals if number not in requests.signals)
    try:
        yield requests
    finally:
        for number, handler in requests.previous.items():
            signal.signal(number, handler)
