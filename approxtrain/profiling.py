"""Where the approximate ops' time goes: the profiler ranges they run their selection
(pair norms + sampler), gathers and scatters in, the time per step spent inside those
ranges and the top kernels of a step (for benchmarks), and the name of the device measured."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

SELECT_RANGE, GATHER_RANGE, SCATTER_RANGE = "approxtrain::select", "approxtrain::gather", "approxtrain::scatter"
RANGES = (SELECT_RANGE, GATHER_RANGE, SCATTER_RANGE)


_NO_RANGE = contextlib.nullcontext()


def profiler_range(name: str) -> contextlib.AbstractContextManager:
    """A profiler range while a profiler runs; otherwise nothing, and nothing while
    ``torch.compile`` traces (it ignores ranges). A range costs ~6 us of host time even
    with no profiler listening, and a sampled layer opens five per step: on a GPU the host
    launches the kernels, so that time is the step's (``scripts/bench_host.py``)."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return _NO_RANGE
    return torch.profiler.record_function(name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    return [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])


def range_seconds(step: Callable[[], None], device: torch.device, steps: int) -> tuple[dict[str, float], float]:
    """Run ``step`` ``steps`` times under the profiler; return the seconds per step inside each
    of :data:`RANGES` (device time on CUDA, CPU time otherwise) and the wall seconds per step."""
    _synchronize(device)
    with torch.profiler.profile(activities=_activities(device)) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
        wall = (time.perf_counter() - start) / steps
    per_step = dict.fromkeys(RANGES, 0.0)
    for event in prof.key_averages():
        if event.key in per_step:
            micros = (getattr(event, "device_time_total", 0.0) or 0.0) if device.type == "cuda" else event.cpu_time_total
            per_step[event.key] = micros / 1e6 / steps
    return per_step, wall


def kernel_table(step: Callable[[], None], device: torch.device, rows: int = 30) -> str:
    """The profiler's table of one call of ``step``: its top ``rows`` entries by self time on the
    device (the kernels) on CUDA, by self CPU time (the operators) otherwise."""
    _synchronize(device)
    with torch.profiler.profile(activities=_activities(device)) as prof:
        step()
        _synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=90)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from ``/proc/cpuinfo`` (else the platform's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
