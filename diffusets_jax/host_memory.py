"""Host memory that a CPU train step reuses from one call to the next instead of having it mapped afresh.

Why: XLA:CPU allocates all of a call's temporaries as one block (1.57 GB for a published-size VAE train step at
batch 16). glibc serves a block that large with a fresh `mmap` and gives it back with `munmap`, so the kernel
maps and zero-fills every page of it again on every call: 386k page faults and 0.57 s of system time in a 2.46 s
step (Intel Xeon, 2 cores, 2026-12-05). Two settings let one mapping serve every call:

- glibc's `mallopt`: no `mmap` for large blocks (`M_MMAP_MAX` 0) and no giving the heap's top back to the
  kernel (`M_TRIM_THRESHOLD` -1), so a freed block stays mapped and the next call's temporaries take it again;
- JAX's CPU client runs a single-device program on the thread that calls it (`jax_cpu_enable_async_dispatch`
  off). Its own threads allocate from glibc's per-thread arenas, which map any block over 64 MB afresh whatever
  `mallopt` says, so the first setting alone changes nothing.

With both, the same VAE step had 1 fault and took 2.19 s instead of 2.46 s, the published-size U-Net step at
batch 64 0.21-0.22 s instead of 0.25-0.26 s (benchmarks/HISTORY.md, "Host memory kept for reuse"). The price:
the process keeps its peak host memory until it exits, and the train loop's host work (fetching the next batch,
a few milliseconds) no longer overlaps a step. JAX runs a program split over several devices on its own
threads, so on a CPU mesh of several devices this helps less (a two-device program's result still faulted in
half its pages on every call).
Sampling did not gain (its chain reuses its temporaries inside one call), so only `train` asks for it; the
library leaves the process as it found it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Mapping

# A user who tunes glibc's allocator through its own variable keeps their settings.
TUNABLES_VARIABLE = "GLIBC_TUNABLES"
# glibc's mallopt parameters (<malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Make this process keep and reuse the host memory of its CPU programs' temporaries (module docstring).

    Call it before JAX starts its backends (the first computation): the CPU client reads its dispatch setting then.
    Imports JAX. Does nothing, and returns False, where glibc is not the C library or `GLIBC_TUNABLES` already
    sets its allocator (`glibc.malloc.*`); True when applied.
    """
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in environ.get(TUNABLES_VARIABLE, ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # -1 as a size means "never": glibc documents M_TRIM_THRESHOLD -1 as turning trimming off.
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return False
    import jax

    # A flag, not read from the environment: only this call sets it.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
