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

# allocations of 12-60 MiB, each written and freed: glibc's defaults hand them back to the
# kernel and fault every page in again; kept, only the heap's first growth faults
_LOOP = """
import resource, sys, torch
from splitxai.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    t = torch.empty((1 + i % 5) * (12 << 20) // 4)
    t.fill_(1.0)
    del t
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "SPLITXAI_MALLOC"))}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True,
                         env=environ, check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


def test_user_malloc_settings_are_seen():
    assert not user_malloc_settings({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.x86_avx=1"})
    assert user_malloc_settings({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert user_malloc_settings({"MALLOC_ARENA_MAX": "2"}) is False  # not a tunable's name
    assert user_malloc_settings({"MALLOC_ARENA_MAX_": "2"})
    assert user_malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000000"})
    assert user_malloc_settings({"SPLITXAI_MALLOC": "default"})
    assert not user_malloc_settings({"SPLITXAI_MALLOC": "keep"})
    with pytest.raises(ValueError, match="SPLITXAI_MALLOC='off' is not understood"):
        user_malloc_settings({"SPLITXAI_MALLOC": "off"})


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is kept")
def test_kept_memory_saves_page_faults():
    applied, default = _run("default")
    assert applied == "None"
    applied, tuned = _run("tuned")
    assert applied == "True"
    assert tuned * 2 < default, (tuned, default)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is kept")
def test_user_settings_are_kept():
    assert _run("tuned", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _run("tuned", SPLITXAI_MALLOC="default")[0] == "False"


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
