"""Device-agnostic checks on an accelerator: results on CUDA equal those on the CPU.

Run on a machine with a GPU: ``python benchmarks/device_check.py``. Prints one line per
check and exits non-zero on a failure.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import core
from core.zoo import cifar10_samples, normalize_cifar, resnet20


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> int:
    """Run the checks; return the number of failures."""
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    failures = 0
    x, y = cifar10_samples()
    x = normalize_cifar(x[:8])
    y = y[:8]
    cpu_model, gpu_model = resnet20(), resnet20().cuda()
    xg, yg = x.cuda(), y.cuda()
    checks = []
    for maxpool in ("convex", "wta"):
        sm_c, sm_g = core.split(cpu_model, maxpool=maxpool), core.split(gpu_model, maxpool=maxpool)
        g, h = sm_g(xg)
        checks.append((f"forward g-h vs model on cuda ({maxpool})",
                       _close(g - h, gpu_model(xg), 0), 1e-5))
        assert g.device.type == "cuda"
        layers = ["layer2", "layer3.1.conv2", "input"]
        pc = sm_c.sensitivities(x, y, layers, alpha=0.4)
        pg = sm_g.sensitivities(xg, yg, layers, alpha=0.4)
        for name in layers:
            for attr in ("pos", "g", "h", "grad"):
                checks.append((f"sensitivities {name}.{attr} cuda vs cpu ({maxpool})",
                               _close(getattr(pg[name], attr), getattr(pc[name], attr), 0), 1e-3))
        seed = F.one_hot(y, 10).float()
        rc = sm_c.relevance(x, seed, layers=["layer2"])
        rg = sm_g.relevance(xg, seed.cuda(), layers=["layer2"])
        for name in ("input", "layer2"):
            checks.append((f"relevance {name} cuda vs cpu ({maxpool})",
                           _close(rg[name].comb, rc[name].comb, 0), 1e-3))
    try:
        from captum_split import SplitCAM

        cam_c = SplitCAM(cpu_model, "layer2").attribute(x, target=y)
        cam_g = SplitCAM(gpu_model, "layer2").attribute(xg, target=yg)
        checks.append(("SplitCAM cuda vs cpu", _close(cam_g, cam_c, 0), 1e-3))
    except ImportError as err:
        print(f"captum_split not checked: {err}")
    for name, err, tol in checks:
        ok = err <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tolerance {tol:g})")
    print(f"{len(checks) - failures} passed, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
