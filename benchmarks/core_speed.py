"""Speed and memory of the split against the model and Captum's LayerGradCam.

Ratios are measured in one run on the same machine (issue 2's performance targets), as the
best of ``--repeats`` rounds in which the calls take turns:

- split time: ``core.split(model)`` (tracing and planning);
- forward: one forward of the split pair vs the model's forward (no gradient);
- sensitivities: ``sensitivities`` at one mid layer vs ``LayerGradCam`` at that layer;
- peak memory: the resident-memory peak of each of those two calls, each in a fresh process.

Usage::

    python benchmarks/core_speed.py [--models vgg16 resnet18] [--batch 4] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MID_LAYERS = {"vgg16": "features.14", "resnet18": "layer2", "resnet20": "layer2"}


def build(name: str) -> torch.nn.Module:
    """A model with random weights (speed does not depend on the weights' values)."""
    torch.manual_seed(0)
    if name == "resnet20":
        from core.zoo import resnet20

        return resnet20(pretrained=True)
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each call, the calls taking turns (so that a load on the machine
    hits the baseline and the split alike), after one warm-up round."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for key, fn in calls.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def _calls(name: str, batch: int, size: int, device: str, cache: bool):
    import captum.attr

    import core

    model = build(name).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    target = torch.arange(batch, device=device) % 10
    layer = MID_LAYERS[name]
    sm = core.split(model, cache_abs_weights=cache)
    gradcam = captum.attr.LayerGradCam(model, model.get_submodule(layer))
    return {
        "model_forward": lambda: _no_grad(model, x),
        "split_forward": lambda: _no_grad(sm.forward_pairs, x),
        "layer_gradcam": lambda: gradcam.attribute(x, target),
        "sensitivities": lambda: sm.sensitivities(x, target, [layer], alpha=0.4),
        "split": lambda: core.split(model),
    }


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_peak(fn, device: str = "cpu") -> float:
    """Peak memory (MiB) during ``fn()`` above the level before it.

    CPU: resident memory, polled; CUDA: the allocator's peak.
    """
    import threading

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    fn()
    peak[0] = max(peak[0], _rss_mib())
    done.set()
    thread.join()
    return peak[0] - base


def peak_memory(name: str, call: str, batch: int, size: int, device: str, cache: bool) -> float:
    """Resident-memory peak (MiB) of one call above the state before it, in a new process."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r});"
        "from benchmarks.core_speed import _calls, measure_peak;"
        f"calls = _calls({name!r}, {batch}, {size}, {device!r}, {cache!r});"
        f"print(measure_peak(calls[{call!r}], {device!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(models: list[str], batch: int, size: int, repeats: int, device: str,
        cache: bool) -> list[dict]:
    """Measure every model; returns one row of numbers per model."""
    rows = []
    for name in models:
        calls = _calls(name, batch, size, device, cache)
        t = interleaved(calls, repeats)
        mem_cam = peak_memory(name, "layer_gradcam", batch, size, device, cache)
        mem_sens = peak_memory(name, "sensitivities", batch, size, device, cache)
        rows.append({
            "model": name, "layer": MID_LAYERS[name],
            "split_ms": 1000 * t["split"],
            "forward_ratio": t["split_forward"] / t["model_forward"],
            "sens_s": t["sensitivities"], "gradcam_s": t["layer_gradcam"],
            "sens_ratio": t["sensitivities"] / t["layer_gradcam"],
            "mem_sens_mib": mem_sens, "mem_gradcam_mib": mem_cam,
            "mem_ratio": mem_sens / max(mem_cam, 1e-9),
        })
    return rows


def markdown(rows: list[dict], batch: int, size: int, device: str, threads: int) -> str:
    """The results as a Markdown table."""
    head = (f"CPU threads: {threads}, device: {device}, batch {batch}, {size}x{size}, float32\n\n"
            "| model | layer | split (ms) | split fwd / model fwd | sensitivities (s) | "
            "LayerGradCam (s) | ratio | peak mem sens. (MiB) | peak mem LayerGradCam (MiB) | "
            "ratio |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['model']} | {r['layer']} | {r['split_ms']:.1f} | {r['forward_ratio']:.2f}x | "
        f"{r['sens_s']:.3f} | {r['gradcam_s']:.3f} | {r['sens_ratio']:.2f}x | "
        f"{r['mem_sens_mib']:.0f} | {r['mem_gradcam_mib']:.0f} | {r['mem_ratio']:.2f}x |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"],
                        choices=sorted(MID_LAYERS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-abs-weights", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.models, args.batch, args.size, args.repeats, args.device,
               args.cache_abs_weights)
    table = markdown(rows, args.batch, args.size, args.device, args.threads)
    print(table)
    print(json.dumps(rows, indent=1))
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
