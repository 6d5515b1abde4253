"""How a run ends other than finished: the errors the trainer raises and the one line that reports them."""

from __future__ import annotations


class RunError(Exception):
    """A run that cannot go on; the message is one line that stands on its own."""


class TrainingDiverged(RunError):
    """The training loss became NaN or infinite."""


class RunInterrupted(RunError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after it saved a checkpoint."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


def failure_message(error: BaseException) -> str:
    """One line for a failed run: a ``ValueError``'s (ours name the bad value and the allowed ones) or a
    :class:`RunError`'s message as is; anything else prefixed with its type."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else type(error).__name__
    return message if isinstance(error, (ValueError, RunError)) else f"{type(error).__name__}: {message}"
