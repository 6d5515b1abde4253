"""CPU allocator tuning for the CLI and the benchmarks (never done by the core library).

glibc returns large blocks (the activations and gradients of a training step) to
the OS when they are freed and page-faults them back in at the next allocation;
on CPU that costs a training step tens of milliseconds per 64 MiB, for exact and
approximate layers alike. Keeping freed memory in the heap -- what jemalloc and
tcmalloc do -- removes that. :func:`retain_freed_memory` tells glibc so through
``mallopt`` in the running process (no re-execution): allocations made after the call
come from the heap and stay there. The process's peak RSS then stays at its
high-water mark. Opt out with ``APPROXTRAIN_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h) and the values set: no mmap'd chunks, never trim the heap's
# top (-1: "disables trimming completely", mallopt(3)), grow the heap 1 GiB at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: 1 << 30}


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed memory in the heap (Linux/glibc only); returns whether it did.

    ``APPROXTRAIN_MALLOC=system`` leaves the allocator as it is.
    """
    if not sys.platform.startswith("linux") or os.environ.get("APPROXTRAIN_MALLOC") == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
