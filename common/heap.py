"""Keep the C heap from holding on to freed memory while a big model is read and trained (glibc; elsewhere these
are no-ops that return False).

glibc keeps the memory `free` returns inside its heap unless the block was big enough to have been `mmap`ed, and
its threshold for that grows to the size of the largest block freed so far (up to 32 MiB): after the first big
temporaries (a float chunk of a weight being quantized, a dequantized weight, an activation), the later ones land
in the heap, and what they leave behind stays resident. `release_freed_memory` (`malloc_trim(0)`) hands every
wholly free page back once; `keep_heap_small` pins the threshold at glibc's default (128 KiB), which also stops its
growth, so every bigger block is unmapped as soon as it is freed. Measured on the 16-block Llama-style client part
in int8 (docs/benchmarks.md): its training step's peak fell from 866 to 705 MiB.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, fixed instead of growing


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None)  # the process's own C library
    except OSError:
        return None


def _call(name: str, *args: int) -> bool:
    function = getattr(_libc(), name, None)
    return function is not None and bool(function(*args))


def release_freed_memory() -> bool:
    """Return the heap's wholly free pages to the OS (glibc's `malloc_trim(0)`); False where there is none to
    return or no such call."""
    return _call("malloc_trim", 0)


def keep_heap_small(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc `mmap` every block of `threshold` bytes or more, and unmap it when freed, from now on (its
    dynamic threshold stops growing); True where that was set."""
    return _call("mallopt", M_MMAP_THRESHOLD, threshold)
