"""Handing freed heap memory back to the system after a model load.

Loading a model allocates far more than it keeps (transformers builds a tokenizer through
temporary vocabularies, a converted checkpoint passes through buffers), and glibc's malloc keeps
what was freed in its arenas, where it stays resident, and counts toward the process's peak,
for the life of the kernel. `malloc_trim(0)` returns the free pages at the arenas' tops and
inside them (about 50 MB after the default model's load).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


def release_freed_memory() -> bool:
    """Return malloc's free memory to the system; False where the C library cannot."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
