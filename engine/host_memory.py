"""Give memory the process freed back to the operating system (glibc's allocator keeps it otherwise).

Loading a model in a quantized format first holds the float32 weights, then
frees them. The freed blocks are mostly under glibc's dynamic mmap threshold
(which rises to 32 MB once the loader frees a large buffer), so they sit in
the allocator's heaps, still counted in the process's resident memory: an
int8 worker stayed as large as a float32 one. ``malloc_trim(0)`` hands every
free page of every heap back. Elsewhere (no glibc) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def trim_allocator() -> bool:
    """Collect garbage, then return free heap pages to the OS; True if glibc did it."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
