"""Reuse of host memory between calls on CPU (glibc's allocation thresholds)."""

import ctypes
import ctypes.util
import sys


# `mallopt` parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_host_memory(threshold: int = 2**30) -> bool:
    """Let glibc keep freed blocks of up to `threshold` bytes for reuse (process-wide).

    XLA:CPU allocates all temporaries of a compiled function in one block on every
    call. glibc serves a block of more than 32 MiB by a fresh `mmap` and returns it
    to the kernel afterwards, so every call then pays a page fault for each 4 KiB page
    it writes: at 256², ‖tA‖ = 50 (60 MB of temporaries) that doubled the time of
    `expmv` and of its gradient. This call raises glibc's `mmap` and trim thresholds
    together, as the environment variables `MALLOC_MMAP_THRESHOLD_` and
    `MALLOC_TRIM_THRESHOLD_` would before start-up, so such blocks come from the heap
    and are reused. The price: the process keeps up to `threshold` bytes of freed
    memory instead of returning it. It changes the whole process (every library's
    allocations) from the call on, which is why krylovexp never does it by itself.

    **Arguments:**

    - `threshold`: the new thresholds in bytes, `0 < threshold < 2**31`.

    **Returns:** whether both were set: `False` off Linux or without glibc's
    `mallopt` (musl's is a stub).

    See the "Memory of XLA:CPU" paragraph of the algorithm page.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"`threshold` must be an int, got {type(threshold).__name__}")
    if not 0 < threshold < 2**31:
        raise ValueError(f"`threshold` must lie in (0, 2**31) bytes, got {threshold}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Both or neither: the `mmap` threshold alone switches off glibc's dynamic trim
    # threshold, and the heap is then returned to the kernel after every call.
    if mallopt(_M_TRIM_THRESHOLD, threshold) != 1:
        return False
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
