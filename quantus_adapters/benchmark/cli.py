"""``splitxai benchmark``: the paper's evaluation on a built-in or user model and data set.

Without arguments it runs offline on the built-in default (cluttered scikit-learn digits and
a small VGG-style CNN trained on the fly and cached). See ``splitxai benchmark --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from quantus_adapters import class_blind
from quantus_adapters import cli_common as common
from quantus_adapters.benchmark.zoo.spec import BUILTIN_MODELS, ModelSpec
from quantus_adapters.cluster import RayOptions, require_ray

__all__ = ["main", "build_parser"]

DEFAULT_ALPHAS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.0, "auto")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splitxai benchmark``."""
    p = argparse.ArgumentParser(
        prog="splitxai benchmark",
        description="Evaluate the Split methods and the baselines with Quantus (paper section "
                    "5): layer selection on a validation split, comparison on the test split, "
                    "alpha ablation, randomisation check, timing. Results go to --out as CSV "
                    "and Markdown tables and PNG figures.")
    common.add_model_arguments(
        p, model_help="digits-cnn (default with --data digits), cifar10-resnet20, vgg16, "
                      "resnet18 (ImageNet, torchvision IMAGENET1K_V1 weights) or "
                      "FILE.py:FACTORY (FACTORY() returns an nn.Module taking images in "
                      "[0, 1], normalisation inside)",
        data_help="digits (default), cifar10-resnet20, folder:PATH (PATH/images/*, "
                  "PATH/labels.csv 'name,label', optional PATH/masks/*) or imagenet-s:PATH "
                  "(ImageNet-S-50 layout)")
    common.add_method_arguments(
        p, methods_required=False,
        methods_help="method names (as in quantus_adapters.available_methods()), e.g. "
                     "SplitCAM LayerCAM Saliency; default: all of table 1",
        layers_help="candidate layers of layer-wise methods (module names); default: up to "
                    "--max-layers chosen from the model",
        alpha_default="0.4",
        alpha_help="alpha of SplitCAM/SplitGrad in the main comparison, in [0, 0.5] or "
                   "'auto' (default 0.4)")
    p.add_argument("--alphas", nargs="+", default=None,
                   help="alpha grid of the ablation, each in [0, 0.5] or 'auto' (default 0.5 "
                        "0.45 0.4 0.35 0.3 0 auto; --quick: --alpha)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="metrics to compute (default all): Selectivity AttrLoc Pointing "
                        "PF@5 PF@20 MaxSens RandLogit")
    p.add_argument("--nonlinear", choices=("error", "freeze"), default="error",
                   help="'freeze': the Split methods split smooth units, gates, attention and "
                        "normalisations with their factors frozen (core.split's option; "
                        "recorded in the report); default 'error'")
    p.add_argument("--quick", action="store_true",
                   help="few images, two layers, one alpha, fewer metric samples (<= 2 min)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (at most)")
    p.add_argument("--n-test", type=int, default=None, help="test images (at most)")
    p.add_argument("--max-layers", type=int, default=None,
                   help="candidate layers chosen automatically (default 5; --quick 2)")
    p.add_argument("--max-sens-samples", type=int, default=None,
                   help="Max Sensitivity samples per image (default 25; --quick 5)")
    p.add_argument("--max-sens-images", type=int, default=None,
                   help="test images for Max Sensitivity (default 10; --quick 5)")
    p.add_argument("--selectivity-patch", type=int, default=None,
                   help="Selectivity patch side in pixels (default: side / 8)")
    p.add_argument("--no-figures", action="store_true",
                   help="write the tables and report only (no PNG figures; faster)")
    common.add_run_arguments(
        p, out="splitxai-benchmark", batch_size=64,
        resume_help="reuse the cells in --out/cells.jsonl whose fingerprint (model, data, "
                    "method and metric options, seed, versions) matches; compute the rest",
        seed_help="seed of data, training and metrics",
        threads_help="torch CPU threads (default: 1 for the built-in digits, whose small "
                     "convolutions run fastest on one thread; torch's choice otherwise)",
        progress_help="no progress bars")
    return p


def _model_skeleton(args) -> tuple[nn.Module, ModelSpec]:
    """The model and its spec (the built-in digits CNN untrained: trained after all checks)."""
    spec = ModelSpec.from_options(args.model, args.weights, args.data, args.cache_dir)
    if spec.name == "digits-cnn" and not args.weights:
        return spec.architecture(), spec
    return spec.load(), spec


def _specs(args, available: dict, image_size: int, channels: int, notes: list[str]):
    from quantus_adapters.benchmark.protocol import default_methods

    specs = default_methods(alpha=args.alpha, quick=args.quick, image_size=image_size,
                            channels=channels)
    if args.nonlinear != "error":  # the Split methods split smooth operations frozen
        for spec in specs:
            if spec.group == "split":
                spec.options["nonlinear"] = args.nonlinear
        notes.append(f"Split methods with nonlinear={args.nonlinear!r} (smooth operations "
                     "frozen at the model's activations)")
    if args.methods:
        wanted = common.check_methods(common.split_names(args.methods))
        from quantus_adapters.benchmark.protocol import MethodSpec

        known = {s.method for s in specs}
        specs = [s for s in specs if s.method in wanted]
        # methods of other plugins take part as input-attribution baselines
        specs += [MethodSpec(m, m) for m in wanted if m not in known]
    missing = [s.method for s in specs if s.method not in available]
    if missing:
        notes.append(f"not installed, skipped: {', '.join(sorted(set(missing)))} (install "
                     "splitxai[all])")
    clashes = [s.method for s in specs if str(available.get(s.method, "")).startswith("CLASH")]
    if clashes:
        notes.append(f"name clash between plugins, skipped: {', '.join(clashes)}")
    return [s for s in specs if s.method in available and s.method not in clashes]


def main(argv: list[str] | None = None) -> int:
    """Run ``splitxai benchmark``; returns the exit status.

    0: done; 2: bad input (one line on stderr); 130: interrupted (SIGINT or SIGTERM; the
    finished cells are stored, ``--resume`` continues); 1: a job, a metric cell, the
    randomisation check or a timing failed (each named on stderr and in the report) or an
    unexpected error (one line; ``--debug`` shows the traceback of any error). See
    :mod:`quantus_adapters.cli_common`.
    """
    args = build_parser().parse_args(argv)
    builtin = args.data == "digits" and args.model in (None, "digits-cnn")
    return common.run("splitxai benchmark", args, _run,
                      kept=f"finished cells are in {args.out}/cells.jsonl -- run again "
                           "with --resume to continue",
                      threads=1 if builtin else None)


def _run(args) -> int:
    import quantus_adapters
    from quantus_adapters.benchmark import data as data_mod
    from quantus_adapters.benchmark import protocol, report
    from quantus_adapters.benchmark.runner import Benchmark
    from quantus_adapters.benchmark.store import ResultStore
    from quantus_adapters.benchmark.zoo import models

    start = time.perf_counter()
    progress = not args.no_progress
    ray_options = common.check_options(args, ("n_val", "n_test", "max_layers",
                                              "max_sens_samples", "max_sens_images",
                                              "selectivity_patch"))
    if args.alphas is not None:
        args.alphas = [protocol.check_alpha(a, "--alphas") for a in args.alphas]
    metrics = protocol.check_metrics(common.split_names(args.metrics) if args.metrics
                                     else list(protocol.METRICS))
    if ray_options is not None:
        require_ray()
    common.check_device(args.device)  # the driver's model is on --device also with Ray
    torch.manual_seed(args.seed)

    # 1. cheap checks first: model skeleton, data, labels, layers, methods
    model, spec = _model_skeleton(args)
    model_name = spec.name if spec.name in BUILTIN_MODELS else args.model
    channels = common.input_channels(model, args.data)
    data = data_mod.load_data(args.data, seed=args.seed, image_size=args.image_size,
                              channels=channels)
    common.check_data_channels(channels, data.images, args.data)
    common.print_warnings("splitxai benchmark", data.warnings)
    if args.selectivity_patch is not None:
        protocol.check_selectivity_patch(args.selectivity_patch, data.images.shape)
    n_val = args.n_val or (5 if args.quick else None)
    n_test = args.n_test or (5 if args.quick else (40 if args.data == "digits" else None))
    data = data.limit(n_val, n_test)
    if len(data.val_idx) == 0 or len(data.test_idx) == 0:
        raise common.UsageError("the data has no validation or no test image")
    model = model.to(args.device).eval()
    common.check_classifier(model, data.images, data.labels, data.names, args.device,
                            data.name)
    max_layers = args.max_layers or (2 if args.quick else 5)
    if args.layers:
        layers = protocol.check_layers(model, args.layers)
    else:
        layers = protocol.candidate_layers(model, max_layers)
    notes: list[str] = data.mask_notes()
    available = quantus_adapters.available_methods()
    specs = _specs(args, available, int(data.images.shape[-1]), int(data.images.shape[1]),
                   notes)
    if not specs:
        raise common.UsageError("no method to evaluate (none of the requested methods is "
                                "installed)")
    alphas = args.alphas or ([args.alpha] if args.quick else list(DEFAULT_ALPHAS))
    out = Path(args.out)
    store = ResultStore(out)  # checks that --out is a writable folder

    # 2. heavy work: the built-in model is trained (or read from the cache) now
    if model_name == "digits-cnn" and not args.weights:
        trained = models.digits_cnn(cache_dir=args.cache_dir, seed=0, progress=progress)
        model.load_state_dict(trained.state_dict())
        model.eval()
        with torch.no_grad():
            x, y, _ = data.subset("test")
            acc = float((model(x.to(args.device)).argmax(1).cpu() == y).float().mean())
        notes.append(f"digits CNN accuracy on the {len(y)} test canvases: {100 * acc:.1f} %")

    settings = protocol.ProtocolSettings(
        max_sens_samples=args.max_sens_samples or (5 if args.quick else 25),
        max_sens_images=args.max_sens_images or (5 if args.quick else 10),
        selectivity_patch=args.selectivity_patch,
        device=args.device, seed=args.seed, batch_size=args.batch_size, metrics=metrics)
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        map_jobs = None
        if ray_options is not None:
            map_jobs = _ray_jobs(stack, ray_options, spec, model, args.device, notes)
            failures = map_jobs.failures
        bench = Benchmark(model, data, specs, layers, store, settings, alphas=alphas,
                          n_saliency=4, n_sanity=5 if args.quick else 20,
                          n_timing=4 if args.quick else 8, progress=progress,
                          reuse=args.resume, map_jobs=map_jobs)
        bench.notes.extend(notes)
        results = bench.run()
    results.elapsed = time.perf_counter() - start
    if args.resume:
        print(f"--resume: reused {results.reused} stored cells whose fingerprint matches, "
              f"computed {results.computed}")
    header = (f"Model `{model_name}`, data `{data.name}` ({len(data.val_idx)} validation, "
              f"{len(data.test_idx)} test images, {tuple(data.images.shape[1:])}), "
              f"{'quick run, ' if args.quick else ''}seed {args.seed}, device {args.device} "
              f"({torch.get_num_threads()} CPU threads); "
              f"Max Sensitivity with {settings.max_sens_samples} samples on the first "
              f"{settings.max_sens_images} test images; Selectivity patches of "
              f"{settings.selectivity_patch or protocol.selectivity_patch(data.images.shape)}"
              " px; "
              f"Pixel Flipping {protocol.features_in_step(tuple(data.images.shape[1:]))} "
              "features a step (112 pixels at 224x224, scaled), image-mean replacement.")
    with store.lock():  # the files of one run together, even with another run on --out
        path = report.write_report(results, out, header, figures=not args.no_figures)
        (out / "run.json").write_text(json.dumps(
            {"argv": sys.argv, "model": model_name, "data": data.name, "layers": layers,
             "methods": [s.label for s in specs], "alphas": alphas,
             "seconds": round(results.elapsed, 1)}, indent=2))
    print(report.markdown_table1(results))
    print(f"\nwrote {path} and the tables/figures next to it "
          f"({results.elapsed:.0f} s)")
    blind = class_blind.summary(results.class_blind)
    if blind:  # collected during the run (not printed between the progress bars)
        print(f"splitxai benchmark: warning: {blind}", file=sys.stderr)
    status = 0
    if failures:
        for failure in failures:
            print(f"splitxai benchmark: failed on Ray: {failure}", file=sys.stderr)
        print(f"splitxai benchmark: {len(failures)} job(s) failed; their cells are missing "
              "from the tables (every other cell is stored; --resume computes the missing "
              "ones)", file=sys.stderr)
        status = 1
    if results.errors:
        for where, message in results.errors.items():
            print(f"splitxai benchmark: failed: {where}: {common.one_line(message)}",
                  file=sys.stderr)
        print(f"splitxai benchmark: {len(results.errors)} part(s) failed; their cells are "
              f"missing from the tables (shown as '–'; see {path})", file=sys.stderr)
        status = 1
    return status


def _ray_jobs(stack: contextlib.ExitStack, options: RayOptions, spec: ModelSpec,
              model: nn.Module, device: str, notes: list[str]):
    """Connect to Ray and start the workers (closed with ``stack``); the runner's mapper."""
    from quantus_adapters.benchmark.distributed import RayJobs
    from quantus_adapters.cluster import RemoteModel

    ray = stack.enter_context(options.session())
    workers = options.actors(ray)
    jobs = RayJobs(ray, RemoteModel.put(ray, spec, model), device, workers,
                   options.gpus_per_worker)
    stack.callback(jobs.close)
    res = ray.cluster_resources()
    notes.append(f"computed on Ray: {workers} worker(s) ({options.gpus_per_worker:g} GPU "
                 f"each), cluster of {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} "
                 "GPUs; randomisation check and timing on the driver")
    print(f"Ray: {workers} worker(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs "
          "in the cluster")
    return jobs
