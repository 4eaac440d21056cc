"""`reuse_host_memory`: glibc keeps large freed blocks in the heap afterwards."""

import subprocess
import sys
import textwrap

import pytest

import krylovexp as kx


# In a subprocess: the call changes the allocator of the whole process. A 64 MiB block
# is above glibc's default `mmap` threshold (at most 32 MiB), so once freed it is
# unmapped; after `reuse_host_memory()` it comes from the heap and stays there, free.
_CHECK = textwrap.dedent(
    """
    import ctypes, sys
    import krylovexp as kx

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.mallinfo2.restype = MallInfo2
    applied = kx.reuse_host_memory() if sys.argv[1] == "reuse" else None
    size = 64 * 2**20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print(applied, libc.mallinfo2().fordblks >= size)
    """
)


def _glibc() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


_LINUX_GLIBC = sys.platform.startswith("linux") and _glibc()


@pytest.mark.skipif(not _LINUX_GLIBC, reason="needs glibc")
@pytest.mark.parametrize(
    "mode, expected", [("reuse", "True True"), ("plain", "None False")]
)
def test_freed_blocks_stay_in_the_heap(mode, expected):
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, mode], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("threshold", [0, -1, 2**31, 1.5, True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        kx.reuse_host_memory(threshold)
