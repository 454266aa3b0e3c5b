"""Wall time of ``splitxai benchmark --quick`` without Ray and on a local Ray instance.

Runs, one after the other on this machine and in one invocation: the command without Ray,
with ``--ray --workers 1`` and with ``--ray --workers 2`` (each a fresh process and a fresh
``--out``; the built-in digits CNN is trained into ``--cache-dir`` first so that no run
trains it), then checks that the tables are identical and measures Ray's start-up overhead
on its own: ``ray.init`` of a local instance plus one worker that has imported splitxai
and built the model. Prints a Markdown table (seconds and speed-up against the run
without Ray).

Usage::

    python benchmarks/ray_scaling.py [--out /tmp/ray-scaling] [-- extra benchmark options]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TABLES = ("table1_comparison.csv", "table3_alpha.csv", "table6_randomisation.csv",
          "validation.csv")


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def ray_startup(env: dict) -> tuple[float, float]:
    """Seconds of ``ray.init`` (local) and of one worker importing splitxai + the model."""
    code = (
        "import time, sys\n"
        "t0 = time.perf_counter()\n"
        "import ray\n"
        "ray.init(include_dashboard=False, log_to_driver=False)\n"
        "t1 = time.perf_counter()\n"
        "@ray.remote(num_cpus=1)\n"
        "def load():\n"
        "    import quantus_adapters\n"
        "    from quantus_adapters.benchmark.zoo.spec import ModelSpec\n"
        "    quantus_adapters.available_methods()\n"
        "    return ModelSpec('digits-cnn').architecture() is not None\n"
        "assert ray.get(load.remote())\n"
        "t2 = time.perf_counter()\n"
        "ray.shutdown()\n"
        "print(t1 - t0, t2 - t1)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/splitxai-ray-scaling")
    p.add_argument("extra", nargs="*", help="more options for splitxai benchmark")
    args = p.parse_args()
    out = Path(args.out)
    cache = out / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    py = sys.executable
    subprocess.run([py, "-c", "from quantus_adapters.benchmark.zoo import models; "
                    f"models.digits_cnn(cache_dir={str(cache)!r}, log=None, progress=False)"],
                   env=env, check=True)
    base = [py, "-m", "quantus_adapters", "benchmark", "--quick", "--no-progress",
            "--cache-dir", str(cache), *args.extra]
    runs = [("without Ray", []), ("--ray --workers 1", ["--ray", "--workers", "1"]),
            ("--ray --workers 2", ["--ray", "--workers", "2"])]
    seconds = {}
    for i, (name, extra) in enumerate(runs):
        seconds[name] = _timed([*base, "--out", str(out / f"run{i}"), *extra], env)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    same = all((out / "run0" / t).read_bytes() == (out / f"run{i}" / t).read_bytes()
               for i in (1, 2) for t in TABLES)
    init, worker = ray_startup(env)
    ref = seconds["without Ray"]
    print(f"\nCPU cores: {os.cpu_count()}, load average (1 min) after the runs: "
          f"{os.getloadavg()[0]:.1f}; tables identical: {same}\n")
    print("| run | wall time (s) | speed-up vs without Ray |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| `--quick` {name} | {s:.0f} | {ref / s:.2f}x |")
    print(f"\nRay start-up: ray.init (local) {init:.1f} s, one worker ready (imports splitxai "
          f"and its plugins, builds the model) {worker:.1f} s")


if __name__ == "__main__":
    main()
