"""What capture costs: symbolic tracing, eager recording, cached graphs, re-recording.

    python benchmarks/capture_cost.py [--threads 1] [--size 64] [--batch 2] [--repeats 5]

For torchvision ResNet-18 and VGG-11 (random weights, eval mode, CPU float32) it times, best
of ``--repeats`` with the calls taking turns:

* ``model(x)``: the model's own forward (the unit of the ratios);
* ``core.split(model)``: symbolic tracing and planning, once per model;
* ``split(x)`` symbolic: the split's forward on the traced graph;
* first eager call: recording the forward (one run of the model under the recorder) plus the
  split's forward, once per input signature;
* ``split(x)`` eager, cached: the split's forward on the recorded graph;
* re-recorded call: the cost per call of a forward whose control flow reads tensor values
  (recorded again at every call).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.models as tvm
from torch import nn

import core


class _ValueBranch(nn.Module):
    """The model behind a branch on a tensor value (forces re-recording at every call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.sum() > 1e30:  # never taken, but it reads a value
            out = -out
        return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def measure(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds of each step (best of ``repeats``)."""
    with torch.no_grad():
        model(x)
    build = _best(lambda: core.split(model), repeats)
    sym = core.split(model)
    eager = core.split(model, output=lambda out: out)  # an output selector: eager capture
    eager(x)

    def first_eager() -> None:
        core.split(model, output=lambda out: out)(x)

    rerecord = core.split(_ValueBranch(model).eval())
    times = _interleaved({
        "model": lambda: model(x),
        "symbolic": lambda: sym(x),
        "eager cached": lambda: eager(x),
        "first eager call": first_eager,
        "re-recorded call": lambda: rerecord(x),
    }, repeats)
    times["core.split"] = build
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"CPU float32, {args.threads} thread(s), batch {args.batch}, {args.size}x{args.size}, "
          f"best of {args.repeats}\n")
    cols = ["model", "core.split", "symbolic", "eager cached", "first eager call",
            "re-recorded call"]
    print("| model | " + " | ".join(f"{c} (ms)" for c in cols) + " | eager cached / symbolic"
          " | first eager / model | re-recorded / symbolic |")
    print("|---" * (len(cols) + 4) + "|")
    for name, make in (("resnet18", tvm.resnet18), ("vgg11", tvm.vgg11)):
        model = make(weights=None).eval()
        t = measure(name, model, x, args.repeats)
        row = " | ".join(f"{1000 * t[c]:.1f}" for c in cols)
        print(f"| {name} | {row} | {t['eager cached'] / t['symbolic']:.2f}x | "
              f"{t['first eager call'] / t['model']:.2f}x | "
              f"{t['re-recorded call'] / t['symbolic']:.2f}x |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
