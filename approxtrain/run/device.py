"""Where a run computes: device choice (per rank), step timing and peak memory."""

from __future__ import annotations

import resource
import time

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` (an error naming the choices when there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def training_device(name: str, world_size: int = 1, local_rank: int = 0) -> torch.device:
    """This rank's device: ``trainer.device`` (``name``), with CUDA's index the rank's on its node."""
    device = resolve_device(name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


class StepTimer:
    """Wall time of each training step, read back once per epoch by :meth:`collect`.

    On CUDA a pair of events brackets each step, so timing costs no host sync per step;
    on the CPU the host clock is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._times: list[float] = []
        self._start: torch.cuda.Event | float | None = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._times.append(time.perf_counter() - self._start)

    def collect(self) -> list[float]:
        """The step times (seconds) since the last call."""
        if self._events:
            self._events[-1][1].synchronize()
            self._times.extend(start.elapsed_time(end) / 1000 for start, end in self._events)
            self._events.clear()
        times, self._times = self._times, []
        return times


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
