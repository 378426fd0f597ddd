"""glibc's malloc set to keep freed memory for reuse, for training on the CPU.

A training step allocates and frees the same tensors every step. glibc serves the
large ones (above its mmap threshold, 128 KiB at first and raised by each free up to
32 MiB) with fresh mappings, and returns free memory at the top of its heap to the OS
beyond its trim threshold (twice the mmap threshold): the next step then faults those
pages in again, and the kernel zeroes each (about 1 us a page). How often depends on
where the dynamic thresholds settle: PreResNet-20 steps at batch 128 under bf16
autocast took 800 to 15,000 faults each from run to run on a 2-core Zen 4, and with
both thresholds raised 0 to 200, at the same peak RSS. In the runs that faulted most,
steps went 151 -> 134 ms (baseline) and 220 -> 205 ms (proposed-3); in the others the
difference was within the machine's noise. It is a process setting, so
`python -m fastnl.train` applies it on CPU (`--no-keep-freed-memory` leaves malloc as
it is), not the library.
"""
import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: bigger tensors are still mapped
TRIM_THRESHOLD = 1 << 30


def _glibc():
    """The process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # musl and others have no gnu_get_libc_version
        return None
    return libc


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds for this process; returns what was set, or
    why nothing was (not glibc), for the run's config.json."""
    libc = _glibc()
    if libc is None:
        return "unchanged (not glibc)"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "unchanged (mallopt refused)"
    return f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
