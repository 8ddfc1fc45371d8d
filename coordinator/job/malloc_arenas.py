"""glibc malloc arenas in a process that hosts many agent threads (the demo's in-process fleet).

glibc gives threads their own malloc arenas, up to 8 per core, so that threads allocating at once do not
wait on one lock. Each arena keeps the memory its threads freed for reuse by the same arena, so a process
with a hundred busy agent threads holds up to 16 partly empty heaps on a 2-core machine. In the demo the
agents' threads take turns on the interpreter lock anyway, so the arenas buy little speed and cost memory:
measured on the reference machine, 10 -> 60 in-process agents, 5 rounds, the process's private memory grew
by 0.58 MiB per agent with glibc's default and 0.41 MiB per agent with two arenas.

`cap_malloc_arenas(n)` sets glibc's M_ARENA_MAX (what the MALLOC_ARENA_MAX environment variable sets at
start-up) for the arenas created from then on; it leaves an explicit MALLOC_ARENA_MAX alone and does
nothing off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Cap this process's malloc arenas at `arenas`; True if glibc took the setting."""
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # present only in glibc (musl's mallopt is a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1
