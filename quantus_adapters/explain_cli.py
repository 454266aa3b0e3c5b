"""``splitxai explain``: bulk explanations of a data set, in this process or on Ray.

One compressed ``.npz`` per image and method configuration, an index CSV, resumable (see
:mod:`quantus_adapters.bulk` for the layout). Model and data options are those of
``splitxai benchmark``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from quantus_adapters import class_blind
from quantus_adapters import cli_common as common

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``splitxai explain``."""
    p = argparse.ArgumentParser(
        prog="splitxai explain",
        description="Explain every image of a data set with one or more methods and write "
                    "one compressed array per image and method configuration "
                    "(OUT/maps/<configuration>/<image file name>.npz, e.g. "
                    "OUT/maps/SplitCAM@layer3_alpha=0.4/cat.png.npz, array 'map' of shape "
                    "(H, W)) and OUT/index.csv. Resumable; runs on a "
                    "Ray cluster with --ray.")
    common.add_model_arguments(
        p, model_help="digits-cnn (default with --data digits), cifar10-resnet20, vgg16, "
                      "resnet18 or FILE.py:FACTORY, as in splitxai benchmark",
        data_help="digits, cifar10-resnet20, folder:PATH (PATH/images/*, PATH/labels.csv) or "
                  "imagenet-s:PATH, as in splitxai benchmark; the maps explain each image's "
                  "label")
    common.add_method_arguments(
        p, methods_required=True,
        methods_help="method names (quantus_adapters.available_methods()), e.g. SplitCAM "
                     "SplitLRP",
        layers_help="layers (module names) of the methods that take a layer: one map per "
                    "layer; default: each method's default layer",
        alpha_default=None,
        alpha_help="alpha of the methods that take one (SplitCAM, SplitGrad), in [0, 0.5] or "
                   "'auto'; default: the method's")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another method option for the methods that take it, e.g. "
                        "--option stream=h (VALUE read as JSON, else as text); repeatable")
    p.add_argument("--float16", action="store_true",
                   help="store the maps as float16 (half the disk space; about 3 significant "
                        "digits)")
    p.add_argument("--max-images", type=int, default=None, help="explain the first N images")
    common.add_run_arguments(
        p, out="splitxai-maps", batch_size=16,
        resume_help="add the missing maps to an --out of an earlier run of the same setup",
        seed_help="seed of the built-in digits data and of random methods (Random, "
                  "GradientShap: seeded per batch, so a run gives the same maps with or "
                  "without Ray)",
        threads_help="torch CPU threads of this process (Ray workers use one each)",
        progress_help="no progress bar")
    return p


def _check_option_alpha(value: object) -> object:
    """``--option alpha=VALUE`` checked as ``--alpha`` (``auto`` in any case, a number in
    [0, 0.5]); a JSON object ``{shift point: alpha}`` by :func:`core.shift.check_alpha`."""
    from quantus_adapters.benchmark.protocol import check_alpha

    if isinstance(value, dict):
        from core.shift import check_alpha as check_mapping

        try:
            check_mapping(value)
        except (TypeError, ValueError) as exc:
            raise common.UsageError(f"--option alpha=...: {exc}") from None
        return value
    return check_alpha(value, "--option alpha")


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise common.UsageError(f"--option {item!r}: expected KEY=VALUE, e.g. stream=h")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    """Run ``splitxai explain``; returns the exit status.

    0: done; 1: some maps failed (named on stderr; the others are stored) or an unexpected
    error; 2: bad input (one line on stderr); 130: interrupted (SIGINT or SIGTERM; ``--resume``
    adds the rest). See :mod:`quantus_adapters.cli_common`.
    """
    args = build_parser().parse_args(argv)
    return common.run("splitxai explain", args, _run,
                      kept=f"the finished maps are in {args.out} -- run again with "
                           "--resume to add the rest")


def _fingerprint(spec, model, data_name: str, images: np.ndarray, labels: np.ndarray,
                 names: list[str], float16: bool, seed: int) -> dict:
    """What the stored maps depend on (``--resume`` refuses an --out of another setup)."""
    from quantus_adapters.benchmark.cells import architecture_digest, code_digest, library_versions
    from quantus_adapters.bulk import model_digest

    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    digest.update(json.dumps([names, labels.tolist()]).encode())
    # the architecture (repr) too: options built in the factory that are neither weights
    # nor code (transforms.Normalize's mean in an nn.Sequential) change the maps
    return {"model": spec.name, "architecture": architecture_digest(model),
            "weights": model_digest(model), "code": code_digest(model),
            "data": data_name,
            "images": digest.hexdigest(), "n_images": len(names),
            "dtype": "float16" if float16 else "float32", "seed": seed,
            # as the benchmark's: another splitxai, Captum, Zennit or torch may give other maps
            "versions": library_versions()}


def _run(args) -> int:
    from quantus_adapters import bulk, cluster
    from quantus_adapters.benchmark import data as data_mod
    from quantus_adapters.benchmark.protocol import check_layers
    from quantus_adapters.benchmark.zoo.spec import ModelSpec

    start = time.perf_counter()
    ray_options = common.check_options(args, ("max_images",))
    if ray_options is not None:
        cluster.require_ray()
    else:  # with Ray, this process holds the model on the CPU; the workers use --device
        common.check_device(args.device)
    options = _parse_options(args.option)
    for key, flag in (("alpha", args.alpha), ("layer", args.layers)):
        if key in options and flag is not None:
            raise common.UsageError(f"--option {key}=... and --{key}{'s' * (key == 'layer')} "
                                    "both give the same option; give one of them")
    if "alpha" in options:  # before the model and the data, as --alpha
        options["alpha"] = _check_option_alpha(options["alpha"])
    spec = ModelSpec.from_options(args.model, args.weights, args.data, args.cache_dir)
    if args.alpha is not None:
        options["alpha"] = args.alpha
    configs = bulk.plan_configs(common.check_methods(common.split_names(args.methods)),
                                args.layers, options)
    progress = not args.no_progress
    model = None
    if spec.weights is not None:  # a local --weights file is checked before the data is read
        model = spec.load(progress=progress, log=print if progress else None)
    # the data in the model's channels (1: grayscale, 3: RGB); no validation / test split
    channels = common.input_channels(spec.architecture() if model is None else model,
                                     args.data)
    data = data_mod.load_data(args.data, seed=args.seed, image_size=args.image_size,
                              channels=channels, split=False)
    common.check_data_channels(channels, data.images, args.data)
    # how the images were read (no report here): the first frame, a rotation, a resize
    common.print_warnings("splitxai explain", data.warnings + data.image_notes)
    n = len(data.names) if args.max_images is None else min(args.max_images, len(data.names))
    names = list(data.names[:n])
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise common.UsageError(f"image names must be unique (they name the map files): "
                         f"{', '.join(dupes[:5])}")
    # all images (--resume may extend --max-images); one file per map, or one is lost
    clashes = bulk.clashing_names(list(data.names))
    if clashes:
        shown = "; ".join(f"{a!r} and {b!r}" for a, b in clashes[:3])
        raise common.UsageError(
            f"{len(clashes)} pair(s) of image names would share one map file: {shown} (map "
            "files keep only A-Z a-z 0-9 . _ - + = @ of the image name, other characters "
            "become '_', and case is ignored on some file systems); rename the images")
    images = np.ascontiguousarray(data.images[:n].numpy().astype(np.float32))
    labels = data.labels[:n].numpy().astype(np.int64)

    # the model: on this process's device (CPU when the work runs on Ray workers)
    if model is None:
        model = spec.load(progress=progress, log=print if progress else None)
    local_device = args.device if ray_options is None else "cpu"
    model = model.to(local_device).eval()
    if args.layers:
        check_layers(model, args.layers)
    common.check_classifier(model, data.images[:n], data.labels[:n], names, local_device,
                            data.name)
    blind = _trial(model, configs, images, labels, local_device)

    # the whole data set, so that --resume may extend --max-images
    fingerprint = _fingerprint(spec, model, data.name, data.images.numpy(),
                               data.labels.numpy(), list(data.names), args.float16,
                               args.seed)
    store = bulk.MapStore(args.out, fingerprint, resume=args.resume, float16=args.float16)
    pairs = bulk.todo_pairs(store, configs, names)
    total = len(configs) * n
    if args.resume:
        print(f"--resume: {total - len(pairs)} of {total} maps already in {args.out}")
    failures: dict[tuple[str, str], list[str]] = defaultdict(list)
    written = 0
    batches = bulk.make_batches(pairs, args.batch_size)
    if pairs:
        if ray_options is None:
            worker = bulk.MapWorker(model, images, labels, configs, local_device,
                                    seed=args.seed)
            results = bulk.explain_locally(worker, batches)
            written = _write(results, store, configs, names, labels, failures, blind,
                             len(pairs), progress)
        else:
            with ray_options.session() as ray:
                n_workers = ray_options.actors(ray)
                make_model = cluster.RemoteModel.put(ray, spec, model)
                print(f"Ray: {n_workers} worker(s), {ray.cluster_resources().get('CPU', 0):g} "
                      f"CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs in the cluster")
                results = bulk.explain_on_ray(ray, make_model, images, labels, configs,
                                              batches, args.device, n_workers,
                                              ray_options.gpus_per_worker, args.seed)
                written = _write(results, store, configs, names, labels, failures, blind,
                                 len(pairs), progress)
    seconds = time.perf_counter() - start
    print(f"wrote {written} maps ({len(configs)} configuration(s) x {n} images, "
          f"{total - len(pairs)} already there) to {args.out}; index {store.index} "
          f"({seconds:.0f} s)")
    summary = class_blind.summary(blind)
    if summary:  # collected during the run (not printed in the middle of the progress bar)
        print(f"splitxai explain: warning: {summary}", file=sys.stderr)
    if failures:
        for (folder, error), which in failures.items():
            shown = ", ".join(which[:3]) + (" ..." if len(which) > 3 else "")
            print(f"splitxai explain: failed: {folder} on {len(which)} image(s) ({shown}): "
                  f"{error}", file=sys.stderr)
        print(f"splitxai explain: {sum(map(len, failures.values()))} map(s) missing; the "
              "others are stored", file=sys.stderr)
        return 1
    return 0


def _trial(model, configs, images: np.ndarray, labels: np.ndarray,
           device: str) -> list[class_blind.ClassBlind]:
    """Each configuration on the first image: bad options or layers fail before heavy work.

    Returns the class-blind maps met (the core reports a layer once per model: here).
    """
    import quantus_adapters
    from quantus_adapters.explain import ConstantExplanationError

    x = torch.from_numpy(images[:1]).to(device)
    y = torch.from_numpy(labels[:1]).to(device)
    blind: list[class_blind.ClassBlind] = []
    for config in configs:
        try:
            with class_blind.collect(config.options.get("alpha")) as found:
                quantus_adapters.explain(model, x, y, method=config.method, **config.options)
        except ConstantExplanationError:
            pass  # one image's constant map is no setup error; the run reports it per map
        except Exception as exc:
            raise common.UsageError(f"{config.method} with {config.options} fails on the "
                                    f"first image: {type(exc).__name__}: {exc}") from exc
        blind += found
    return blind


def _write(results, store, configs, names, labels, failures, blind, total: int,
           progress: bool) -> int:
    """Store the maps as they arrive (one progress bar); failures and class-blind maps are
    collected."""
    from tqdm.auto import tqdm

    from quantus_adapters.bulk import StoreError

    written = 0
    with tqdm(total=total, desc="maps", disable=not progress, dynamic_ncols=True) as bar:
        for batch in results:
            for c, found in zip(batch["config"], batch["class_blind"], strict=True):
                alpha = class_blind.alpha_text(configs[int(c)].options.get("alpha"))
                blind += [class_blind.ClassBlind(layer, alpha, ratio)
                          for layer, ratio in json.loads(str(found) or "[]")]
            for r, c, amap, error in zip(batch["row"], batch["config"], batch["map"],
                                         batch["error"], strict=True):
                config, name = configs[int(c)], names[int(r)]
                if not error:
                    try:
                        store.put(config, name, int(labels[int(r)]), amap)
                        written += 1
                    except StoreError as exc:
                        error = str(exc)
                if error:
                    failures[(config.folder, str(error))].append(name)
                bar.update(1)
    return written
