"""Freed memory kept in the process for reuse (glibc's ``malloc``), for the command's processes.

An explanation allocates and frees activations, maps and metric arrays of a few hundred KiB
to a few hundred MiB, over and over. With glibc's defaults a freed block of that size goes
back to the kernel (a block above the mmap threshold is unmapped on ``free``; the top of the
heap is trimmed beyond 128 KiB), and the next allocation of the same size maps it again, one
page fault per 4 KiB page it touches. ``splitxai benchmark --quick`` made 10.7 M page
faults that way and spent 21 s of its 74-81 s in the kernel (``docs/benchmark.md``, "Memory:
freed blocks kept for reuse"; ``benchmarks/allocator_speed.py``).

:func:`keep_freed_memory` asks glibc (``mallopt``) to serve blocks up to 32 MiB from the
heap from the start (``M_MMAP_THRESHOLD``; glibc's own threshold only rises there after
such blocks were freed), to return freed heap to the kernel only beyond 512 MiB
(``M_TRIM_THRESHOLD``) and to grow the heap 64 MiB at a time (``M_TOP_PAD``, address space
only: a page costs memory when it is first written). Results do not change (the allocator
decides where a tensor lives, not what is computed; tensors stay 64-byte aligned); the
process's resident memory stays nearer its peak between steps.

The ``splitxai`` command calls it when it runs as its own process, and each Ray worker of
``--ray`` calls it (:mod:`quantus_adapters.cluster`): processes that splitxai owns. Importing
splitxai never changes the allocator of a user's process. It does nothing where the C
library is not glibc, and where the environment already sets glibc's malloc options (any
``MALLOC_*_`` variable, or ``glibc.malloc`` in ``GLIBC_TUNABLES``): that choice is kept.
With ``SPLITXAI_MALLOC=default`` in the environment the command keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# blocks up to 32 MiB come from the heap (the most glibc's own dynamic threshold reaches);
# 1 GiB saved more page faults but raised the benchmark's peak memory by 43 % (fragments)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20  # freed heap beyond 512 MiB goes back to the kernel
TOP_PAD = 64 << 20  # the heap grows 64 MiB at a time

_applied = False


def user_malloc_settings(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment chooses the allocator's settings itself: glibc's malloc
    options, or ``SPLITXAI_MALLOC=default`` (glibc's defaults).

    Parameters
    ----------
    environ: dict, optional
        The environment (default ``os.environ``).

    Raises
    ------
    ValueError
        ``SPLITXAI_MALLOC`` is set to something other than ``default`` or ``keep``.
    """
    env = os.environ if environ is None else environ
    choice = env.get("SPLITXAI_MALLOC", "keep")
    if choice not in ("default", "keep"):
        raise ValueError(f"SPLITXAI_MALLOC={choice!r} is not understood: use 'default' (glibc's "
                         "malloc settings) or 'keep' (keep freed memory for reuse, the default)")
    return (choice == "default" or any(k.startswith("MALLOC_") and k.endswith("_") for k in env)
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""))


def kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _applied


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (see the module docstring).

    Returns
    -------
    bool
        Whether glibc took the settings (False: not glibc, the environment chooses the
        settings, or ``mallopt`` refused).

    Raises
    ------
    ValueError
        ``SPLITXAI_MALLOC`` is not understood (:func:`user_malloc_settings`).
    """
    global _applied
    if _applied:
        return True
    if user_malloc_settings():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                    and mallopt(_M_TOP_PAD, TOP_PAD))
    return _applied
