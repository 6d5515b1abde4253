"""CPU allocator tuning for the CLI and the benchmarks (never done by the core library).

glibc returns large blocks (the activations and gradients of a training step) to
the OS when they are freed and page-faults them back in at the next allocation;
on CPU that costs a training step tens of milliseconds per 64 MiB, for exact and
approximate layers alike. Keeping freed memory in the heap -- what jemalloc and
tcmalloc do -- removes that. glibc reads its settings from the environment when
the process starts, so :func:`retain_freed_memory` sets them and re-executes the
same command once. The process's peak RSS then stays at its high-water mark.
Opt out with ``APPROXTRAIN_MALLOC=system``.
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}


def retain_freed_memory() -> None:
    """Re-execute this command with glibc told to keep freed memory (Linux; once; no-op if set or opted out)."""
    if not sys.platform.startswith("linux") or os.environ.get("APPROXTRAIN_MALLOC") == "system":
        return
    if any(key in os.environ for key in SETTINGS):
        return  # already tuned (or tuned otherwise by the user)
    env = {**os.environ, **SETTINGS}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
