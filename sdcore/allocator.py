"""A process-wide setting for CPU inference: glibc keeps freed memory instead of returning it.

By default glibc gives every large block (an activation of tens of MB) back to the kernel when it is
freed, and the next step faults the same memory in again, one zeroed 4 KiB page at a time. With
no memory-mapped blocks and no trimming, a step reuses the memory the step before it freed.

It changes malloc for everything in the process, so only a program that owns its process calls it:
the job's CPU actors, `sdbatch generate` on the CPU, the benchmarks. The numbers computed stay the
same (PyTorch aligns its buffers itself).
"""
import ctypes
import ctypes.util

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT = "glibc keeps freed memory in the process (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
DEFAULT = "default allocator"


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory; returns what was done, for reports and logs."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return f"{DEFAULT} (no glibc mallopt)"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return f"{DEFAULT} (mallopt refused)"
    return KEPT
