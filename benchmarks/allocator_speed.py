"""The ``splitxai`` command with freed memory kept for reuse vs glibc's defaults.

Runs ``splitxai benchmark`` (default: ``--quick``) alternately with ``SPLITXAI_MALLOC=keep``
(the command's default, :mod:`splitxai.allocator`) and ``SPLITXAI_MALLOC=default`` (glibc's
malloc settings), ``--rounds`` times each, every run in a fresh process and its own output
folder, and prints per setting the best and median wall time, the ratio keep / default, the
page faults (minor), the kernel time and the peak resident memory of the run, and whether
the two settings wrote byte-identical tables (timing table excluded).

Usage::

    python benchmarks/allocator_speed.py [--rounds 2] [--full] [--out allocator.md]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("default", "keep")


def _run(setting: str, out: Path, full: bool) -> dict:
    cmd = [sys.executable, "-m", "splitxai", "benchmark", "--no-progress", "--out", str(out)]
    if not full:
        cmd += ["--quick", "--no-figures"]
    env = {**os.environ, "SPLITXAI_MALLOC": setting}
    # stderr to a file, not a pipe: a pipe that nobody reads during wait4 could fill and
    # block the run
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            err = log.read().decode(errors="replace")
            sys.exit(f"splitxai benchmark failed with SPLITXAI_MALLOC={setting}:\n"
                     f"{err[-2000:]}")
    return {"wall": wall, "faults": usage.ru_minflt, "sys": usage.ru_stime,
            "rss_mib": usage.ru_maxrss / 1024}


def _same_tables(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.csv") if not p.name.startswith("table7"))
    return bool(names) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="the full default benchmark")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        outs: dict[str, Path] = {}  # each setting's last run
        for r in range(args.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                outs[setting] = Path(tmp, f"{setting}-{r}")
                runs[setting].append(_run(setting, outs[setting], args.full))
                print(f"round {r + 1}, {setting}: {runs[setting][-1]}", file=sys.stderr)
        same = _same_tables(outs["keep"], outs["default"])
    best = {s: min(r["wall"] for r in runs[s]) for s in SETTINGS}
    lines = ["| SPLITXAI_MALLOC | wall best (s) | wall median (s) | keep / default | "
             "page faults (M) | kernel time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        rs = runs[s]
        lines.append(
            f"| {s} | {best[s]:.1f} | {statistics.median(r['wall'] for r in rs):.1f} | "
            f"{best[s] / best['default']:.2f} | "
            f"{statistics.median(r['faults'] for r in rs) / 1e6:.2f} | "
            f"{statistics.median(r['sys'] for r in rs):.1f} | "
            f"{max(r['rss_mib'] for r in rs):.0f} |")
    lines.append(f"\nTables 1, 3, 6 and validation byte-identical: {'yes' if same else 'NO'}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
