"""The command's processes keep freed memory for reuse (splitxai.allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from splitxai.allocator import user_malloc_settings

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# one 16 MiB block, allocated and freed: with glibc's defaults it is mapped on its own and
# unmapped on free (the next one faults its pages in again); kept, it comes from the heap
# and stays there after the free
_BLOCK = """
import ctypes, sys
from splitxai.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL("libc.so.6")
names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
         "fordblks", "keepcost")
field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
class Info(ctypes.Structure):
    _fields_ = [(n, field) for n in names]
info = libc.mallinfo2 if hasattr(libc, "mallinfo2") else libc.mallinfo
info.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
before = info()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
mapped = info().hblkhd - before.hblkhd >= size
libc.free(block)
held = info().arena - before.arena >= size
print(applied, mapped, held)
"""


def _run(mode: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "SPLITXAI_MALLOC"))}
    environ.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _BLOCK, mode], capture_output=True, text=True,
                          env=environ, check=True, timeout=120).stdout.split()


def test_user_malloc_settings_are_seen():
    assert not user_malloc_settings({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.x86_avx=1"})
    assert user_malloc_settings({"MALLOC_TRIM_THRESHOLD_": "131072"})
    # the number of arenas (glibc's MALLOC_ARENA_MAX, no trailing "_"): not what is set here
    assert user_malloc_settings({"MALLOC_ARENA_MAX": "2"}) is False
    assert user_malloc_settings({"MALLOC_ARENA_MAX_": "2"})
    assert user_malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000000"})
    assert user_malloc_settings({"SPLITXAI_MALLOC": "default"})
    assert not user_malloc_settings({"SPLITXAI_MALLOC": "keep"})
    with pytest.raises(ValueError, match="SPLITXAI_MALLOC='off' is not understood"):
        user_malloc_settings({"SPLITXAI_MALLOC": "off"})


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is kept")
def test_freed_blocks_stay_in_the_heap():
    assert _run("default") == ["None", "True", "False"]  # glibc: mapped, unmapped on free
    assert _run("tuned") == ["True", "False", "True"]  # kept: from the heap, held after free


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is kept")
def test_user_settings_are_kept():
    assert _run("tuned", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _run("tuned", SPLITXAI_MALLOC="default") == ["False", "True", "False"]


def test_the_command_refuses_a_bad_setting_in_one_line():
    out = subprocess.run([sys.executable, "-m", "splitxai", "--version"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                         "SPLITXAI_MALLOC": "off"}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "splitxai: error: SPLITXAI_MALLOC='off' is not understood: use 'default' (glibc's "
        "malloc settings) or 'keep' (keep freed memory for reuse, the default)"]


def test_importing_splitxai_keeps_the_allocator():
    """Only the command's own process is tuned: importing the packages (and calling the
    command line with explicit arguments, as a program embedding it does) is not."""
    code = ("import splitxai, core, quantus_adapters, splitxai.allocator as a;"
            "from splitxai.cli import main; main(['--version']); print(a.kept())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=120)
    assert out.stdout.split()[-1] == "False"
