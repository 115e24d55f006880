"""The C library through ctypes, loaded once, for the few system calls Python does not wrap
(renameat2, madvise on foreign memory, mincore).

`ctypes.CDLL(None)` is the process's own symbol namespace, which holds libc's functions in any
CPython on Linux; unlike `ctypes.util.find_library("c")` it runs no `ldconfig` subprocess and
imports no `subprocess` module, which every command's start-up would pay.
"""

from __future__ import annotations

import ctypes

_LIBC: list[ctypes.CDLL] = []


def libc() -> ctypes.CDLL:
    """The process's C library namespace (errno kept for ctypes.get_errno)."""
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def function(name: str, argtypes: tuple[object, ...], restype: object = ctypes.c_int) -> object | None:
    """libc's `name` with its argument and result types set, or None where libc lacks it."""
    fn = getattr(libc(), name, None)
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = restype
    return fn
