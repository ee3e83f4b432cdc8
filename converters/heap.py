"""Keep freed memory in the process heap during conversion work.

Why: the calibration and sensitivity passes allocate and free the same few-MB numpy temporaries
for every layer and chunk. glibc hands such blocks back to the kernel on free (mmap threshold,
heap trimming), so each new one pays page faults again — and, with transparent huge pages in
`madvise` mode (numpy asks for them), occasional compaction stalls. Measured on SmolLM2-135M
calibration: ~13% of its CPU time. mallopt is the documented knob; nothing else exposes it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20,
                        top_pad: int = 64 << 20) -> bool:
    """Serve blocks below `mmap_threshold` from the heap and keep up to `trim_threshold` freed bytes.

    glibc-only (Linux); elsewhere a no-op that returns False. Peak memory is unchanged: the heap
    only keeps what was already in use, up to the trim threshold, for the next allocation.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):     # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    _done = ok
    return ok
