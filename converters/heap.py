"""Keep freed memory in the process heap while the calibration pass runs.

Why: the calibration pass allocates and frees the same few-MB numpy temporaries for every layer
and chunk. glibc hands such blocks back to the kernel on free (mmap threshold, heap trimming), so
each new one pays page faults again — and, with transparent huge pages in `madvise` mode (numpy
asks for them), occasional compaction stalls. Measured on SmolLM2-135M calibration: ~13% of its
CPU time. mallopt/malloc_trim are the documented knobs; nothing else exposes them. On leaving,
the defaults come back and the kept memory is returned, so later stages (llama.cpp's quantizer)
do not stack their buffers on top of it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_DEFAULTS = ((_M_MMAP_THRESHOLD, 128 << 10), (_M_TRIM_THRESHOLD, 128 << 10), (_M_TOP_PAD, 128 << 10))


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):     # musl and others have no mallopt
        return None
    return libc


@contextmanager
def retained_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20,
                  top_pad: int = 64 << 20) -> Iterator[bool]:
    """Inside: blocks below `mmap_threshold` come from the heap, which keeps up to `trim_threshold`
    freed bytes. Yields whether the allocator took the settings (glibc only; elsewhere a no-op)."""
    libc = _libc()
    ok = libc is not None and all(libc.mallopt(p, v) == 1 for p, v in
                                  ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                                   (_M_TOP_PAD, top_pad)))
    try:
        yield ok
    finally:
        if libc is not None:
            for p, v in _DEFAULTS:
                libc.mallopt(p, v)
            libc.malloc_trim(0)
