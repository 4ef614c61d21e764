"""The CPU thread count of an engine: validated, or by default the cores this process may use."""
from __future__ import annotations

import os
from typing import Any

MAX_THREADS = 4096


def resolve_threads(num_threads: Any = None) -> int:
    """``num_threads`` checked (an int in 1..4096), or the cores this process may use when None."""
    if num_threads is None:
        affinity = getattr(os, "sched_getaffinity", None)
        return len(affinity(0)) if affinity else (os.cpu_count() or 1)
    if type(num_threads) is not int or not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be an int in 1..{MAX_THREADS} (or None for every core this process "
                         f"may use), got {num_threads!r}")
    return num_threads
