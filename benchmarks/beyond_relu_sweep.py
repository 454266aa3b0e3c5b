"""Which timm model families split with ``nonlinear="freeze"``? One model per family.

A family is the architecture prefix of a timm model name (``convnext_atto`` -> ``convnext``,
``tf_efficientnet_b0`` -> ``tf``). Per family the model with the fewest parameters (counted
on the meta device) among its smallest-named candidates is built with random weights
(``pretrained=False``, 10 classes) and run on CPU at a small input: 64x64 (``img_size=64``
where the model takes it), else its native input size if that is at most 256. A family
*runs* when the model's own forward succeeds there; it *splits* when
``core.split(model, nonlinear="freeze")`` gives ``|g - h - f| <= 1e-5 * max(|g|, |h|, |f|)``
(float32) and ``g - h`` still carries ``f``: ``|g - h - f| <= 1e-3 * max |f|`` (a model
whose streams are 1e19 times its output meets the first bound without carrying anything:
it is counted as *swamped*). Whether the float32 sensitivities at the input (alpha 0.4)
stay finite is recorded too.

Families run one after the other with a time limit each (``--isolate``: each in its own
subprocess, so that a crash costs that family only)::

    nice python -m benchmarks.beyond_relu_sweep --out sweep.jsonl [--families vit convnext]
    python -m benchmarks.beyond_relu_sweep --out sweep.jsonl --retry   # failed ones again
    python -m benchmarks.beyond_relu_sweep --summary sweep.jsonl

A family's last line counts.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

TOLERANCE = 1e-5
CARRIES = 1e-3  # max |g - h - f| / max |f| above this: the streams swamp the output
MAX_PARAMETERS = 100_000_000  # families whose smallest model is larger are not built
_SMALL = ("test", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mini", "lite",
          "s", "b0", "18", "050", "100", "light", "mobile")


def family_of(name: str) -> str:
    """The architecture prefix of a timm model name."""
    return re.sub(r"[0-9].*$", "", name.split("_")[0])


def families() -> dict[str, list[str]]:
    """Every timm family with its model names."""
    import timm

    found: dict[str, list[str]] = {}
    for name in timm.list_models():
        found.setdefault(family_of(name), []).append(name)
    return found


def _candidates(names: list[str], k: int = 6) -> list[str]:
    def rank(name: str) -> tuple:
        tokens = re.split(r"[_.]", name)
        hits = [i for i, word in enumerate(_SMALL) if any(t.startswith(word) or t.endswith(word)
                                                          for t in tokens)]
        return (min(hits) if hits else len(_SMALL), len(name), name)

    return sorted(names, key=rank)[:k]


def smallest(names: list[str]) -> tuple[str, int | None]:
    """The candidate with the fewest parameters (built on the meta device) and its count."""
    import timm
    import torch

    best, best_count = None, None
    for name in _candidates(names):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=10)
            count = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - a candidate that cannot be built is skipped
            continue
        if best_count is None or count < best_count:
            best, best_count = name, count
    return (best, best_count) if best else (_candidates(names)[0], None)


def build(name: str, size: int = 64, largest: int = 256):
    """The model (eval mode, random weights) and an input it runs on (``size``, else the
    model's native size if at most ``largest``), or raise."""
    import timm
    import torch

    torch.manual_seed(0)
    attempts = [dict(img_size=size), {}]
    last: Exception | None = None
    for extra in attempts:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()
        except Exception as err:  # noqa: BLE001 - the next attempt, then report
            last = err
            continue
        native = model.pretrained_cfg.get("input_size", (3, 224, 224))
        sizes = [size] if extra else [size, native[-1]]
        for s in sizes:
            if s > largest:
                continue
            x = torch.randn(1, native[0], s, s)
            try:
                with torch.no_grad():
                    out = model(x)
            except Exception as err:  # noqa: BLE001
                last = err
                continue
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                return model, x
            last = TypeError(f"output {type(out).__name__} is not a (batch, classes) tensor")
    raise RuntimeError(f"does not run on CPU at a small input: {last}")


def relative_error(g, h, f) -> float:
    """``max |g - h - f| / max(|g|, |h|, |f|)``."""
    scale = max(g.abs().max().item(), h.abs().max().item(), f.abs().max().item(), 1e-30)
    return (g - h - f).abs().max().item() / scale


def output_error(g, h, f) -> float:
    """``max |g - h - f| / max |f|``: above :data:`CARRIES` the streams swamp the output (a
    relative error within :data:`TOLERANCE` of streams 1e19 times ``f`` says nothing)."""
    return (g - h - f).abs().max().item() / max(f.abs().max().item(), 1e-30)


def forward_row(g, h, f) -> dict:
    """Both errors of ``g - h`` against ``f`` and the verdict: ``ok`` (within
    :data:`TOLERANCE` of the streams and :data:`CARRIES` of the output) or ``swamped``
    (within the first bound only)."""
    error, missed = relative_error(g, h, f), output_error(g, h, f)
    return {"relative_error": error, "output_error": missed,
            "ok": error <= TOLERANCE and missed <= CARRIES,
            "swamped": error <= TOLERANCE and missed > CARRIES}


def check(model, x, nonlinear: str = "freeze") -> dict:
    """Split ``model`` and measure the forward identity and the input sensitivities."""
    import torch

    import core

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model, nonlinear=nonlinear)
    with torch.no_grad():
        f = model(x)
    g, h = sm(x)
    row = forward_row(g, h, f) | {"frozen": len(sm.frozen_operations(x))}
    try:
        probe = sm.sensitivities(x, 0, ["input"], alpha=0.4)["input"]
        finite = bool(torch.isfinite(probe.S).all() and torch.isfinite(probe.Dg).all())
        row["sensitivities"] = "finite" if finite else "not finite"
    except core.SplitOverflowError as err:
        row["sensitivities"] = f"overflow: {str(err)[:160]}"
    row |= {"output_scale": f.abs().max().item(),
            "stream_scale": max(g.abs().max().item(), h.abs().max().item())}
    if row["swamped"]:  # float32 cannot hold f next to the streams: does float64?
        wide, xw = copy.deepcopy(model).double(), x.double()
        with torch.no_grad():
            fw = wide(xw)
        gw, hw = core.split(wide, nonlinear=nonlinear)(xw)
        row["output_error_float64"] = output_error(gw, hw, fw)
    row["seconds"] = time.perf_counter() - start
    return row


def run_one(family: str, name: str) -> dict:
    """One family's row (never raises)."""
    import torch

    torch.set_num_threads(1)
    row: dict = {"family": family, "model": name}
    try:
        model, x = build(name)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        return row | {"runs": False, "ok": False, "error": str(err)[:300]}
    row |= {"runs": True, "input": list(x.shape)}
    try:
        row |= check(model, x)
    except Exception as err:  # noqa: BLE001 - recorded
        row |= {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return row


def summary(rows: list[dict]) -> str:
    """The coverage line and the failures."""
    ran = [r for r in rows if r.get("runs")]
    ok = [r for r in ran if r.get("ok")]
    unknown = [r for r in rows if r.get("runs") is None]
    lines = [f"{len(ok)} of {len(ran)} timm families that run on CPU at a small input split "
             f"with nonlinear='freeze' within {TOLERANCE:g} of the streams and "
             f"{CARRIES:g} of the output "
             f"({100 * len(ok) / max(1, len(ran)):.1f} %); "
             f"{len(rows) - len(ran) - len(unknown)} of {len(rows)} families do not run "
             f"there, {len(unknown)} timed out or crashed"]
    swamped = [r for r in ran if r.get("swamped")]
    wide = [r for r in swamped if r.get("output_error_float64", float("inf")) <= CARRIES]
    lines.append(f"{len(swamped)} more split within {TOLERANCE:g} of the streams but their "
                 f"streams swamp the output in float32; {len(wide)} of them carry it within "
                 f"{CARRIES:g} in float64")
    finite = [r for r in ok if r.get("sensitivities") == "finite"]
    lines.append(f"{len(finite)} of those {len(ok)} also have finite float32 sensitivities at "
                 "the input (alpha 0.4); the others overflow (use float64 or alpha nearer 0.5)")
    for r in ran:
        if not r.get("ok"):
            why = r.get("error") or (
                f"swamped: |g - h - f| = {r['output_error']:.1e} max |f| (float64: "
                f"{r.get('output_error_float64', float('nan')):.1e}); max |f| "
                f"{r.get('output_scale', float('nan')):.1e}, streams "
                f"{r.get('stream_scale', float('nan')):.1e}" if r.get("swamped")
                else f"relative error {r.get('relative_error')}")
            lines.append(f"  {r['family']:18s} {r['model']:40s} {why}")
    return "\n".join(lines)


class Timeout(Exception):
    """The time limit of :func:`with_time_limit` ran out."""


def with_time_limit(seconds: float, timed_out: dict, fn, *args) -> dict:
    """``fn(*args)``, or ``timed_out`` with the error when it runs longer than ``seconds``
    (SIGALRM; the main thread only)."""

    def alarm(signum, frame):
        raise Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(seconds))
    try:
        return fn(*args)
    except Timeout:
        return timed_out | {"runs": None, "ok": False, "error": f"timeout after {seconds:.0f} s"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def last_rows(path: Path, key: str) -> list[dict]:
    """One row per ``row[key]`` of a JSON-lines file, the last line written for it."""
    rows = {}
    for line in path.read_text().splitlines():
        if line:
            row = json.loads(line)
            rows[row[key]] = row
    return list(rows.values())


def _in_subprocess(family: str, name: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.beyond_relu_sweep", "--one", family, name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"family": family, "model": name, "runs": None, "ok": False,
                "error": f"timeout after {timeout:.0f} s"}
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if last.startswith("{"):
        return json.loads(last)
    return {"family": family, "model": name, "runs": None, "ok": False,
            "error": f"subprocess failed: {proc.stderr[-300:]}"}


def main(argv: list[str] | None = None) -> int:
    """Command line: sweep (each family in a subprocess) or summarise a result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("beyond_relu_sweep.jsonl"))
    parser.add_argument("--families", nargs="*")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--isolate", action="store_true",
                        help="run each family in its own subprocess (slower: imports)")
    parser.add_argument("--retry", action="store_true",
                        help="check again the families that ran but did not split")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return 0
    if args.summary:
        print(summary(last_rows(args.summary, "family")))
        return 0
    table = families()
    wanted = args.families or sorted(table)
    done = set()
    if args.out.exists():
        done = {r["family"] for r in last_rows(args.out, "family")
                if not (args.retry and r.get("runs") is not False and not r.get("ok"))}
    for family in wanted:
        if family in done:
            continue
        name, count = smallest(table[family])
        if count is not None and count > MAX_PARAMETERS:
            row = {"family": family, "model": name, "runs": False, "ok": False,
                   "error": f"smallest model has {count / 1e6:.0f} M parameters (more than "
                            f"{MAX_PARAMETERS / 1e6:.0f} M: not built on CPU)"}
        elif args.isolate:
            row = _in_subprocess(family, name, args.timeout)
        else:
            row = with_time_limit(args.timeout, {"family": family, "model": name}, run_one,
                                  family, name)
        gc.collect()
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{family:18s} {name:40s} ok={row.get('ok')} {row.get('error', '')[:120]}",
              flush=True)
    print(summary(last_rows(args.out, "family")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
