"""What ``splitxai benchmark`` and ``splitxai explain`` share: options, checks, exit codes.

Both commands declare their common options here (model and data, methods, run options, Ray)
and check them here, so that an option means the same and is refused with the same line in
both. :func:`run` is the frame of a command:

======  ====================================================================================
exit    meaning
======  ====================================================================================
0       done
1       partly done (some cells or maps failed; named on stderr) or an unexpected error
        (one line; ``--debug`` shows the traceback)
2       bad input: one line on stderr, before any heavy work
130     interrupted by SIGINT (Ctrl-C) or SIGTERM; finished work is stored, ``--resume``
        continues
======  ====================================================================================
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from quantus_adapters.cluster import RayOptions, WorkerSetupError, add_ray_arguments

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "SEED_MAX", "USER_ERRORS",
    "UsageError",
    "add_method_arguments", "add_model_arguments", "add_run_arguments", "check_classifier",
    "check_data_channels", "check_device", "check_methods", "check_options", "check_seed",
    "input_channels", "one_line", "print_warnings", "run", "split_names",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: the largest ``--seed``: NumPy's global seed (Quantus's Random Logit, Captum) is 32-bit
SEED_MAX = 2**32 - 1


class UsageError(ValueError):
    """A command-line error reported as one line, without a traceback."""


#: errors that are the user's input (exit 2); any other exception is an internal error (exit 1)
USER_ERRORS = (ValueError, OSError, ImportError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its type name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def split_names(values: Sequence[str] | None) -> list[str]:
    """Names given as ``a b``, ``a,b`` or ``"a, b"`` (or all) on the command line."""
    return [name.strip() for item in values or () for name in item.split(",") if name.strip()]


# ----------------------------------------------------------------------------- declarations
def add_model_arguments(parser: argparse.ArgumentParser, model_help: str,
                        data_help: str) -> None:
    """``--model``, ``--weights``, ``--data``, ``--image-size`` and ``--cache-dir``."""
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--weights", default=None,
                        help="a state_dict file loaded into the model")
    parser.add_argument("--data", default="digits", help=data_help)
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize folder / ImageNet-S images to this side")
    parser.add_argument("--cache-dir", default=None,
                        help="where the built-in digits CNN is cached (default "
                             "$SPLITXAI_CACHE, else $XDG_CACHE_HOME/splitxai, else "
                             "~/.cache/splitxai)")


def add_method_arguments(parser: argparse.ArgumentParser, *, methods_help: str,
                         methods_required: bool, layers_help: str, alpha_default: str | None,
                         alpha_help: str) -> None:
    """``--methods``, ``--layers`` and ``--alpha`` (checked by :func:`check_options`)."""
    # repeated (--layers a --layers b): all are kept, not the last only
    parser.add_argument("--methods", nargs="+", action="extend", default=None,
                        required=methods_required, help=methods_help)
    parser.add_argument("--layers", nargs="+", action="extend", default=None,
                        help=layers_help)
    parser.add_argument("--alpha", default=alpha_default, help=alpha_help)


def add_run_arguments(parser: argparse.ArgumentParser, *, out: str, batch_size: int,
                      resume_help: str, seed_help: str, threads_help: str,
                      progress_help: str) -> None:
    """``--out``, ``--resume``, ``--device``, ``--seed``, ``--batch-size``, ``--threads``,
    ``--no-progress``, ``--debug`` and the Ray options (``--ray``, ``--workers``,
    ``--gpus-per-worker``)."""
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per explain call (default {batch_size})")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument("--no-progress", action="store_true", help=progress_help)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (errors are one line otherwise)")
    add_ray_arguments(parser)


# ----------------------------------------------------------------------------- checks
def check_options(args: argparse.Namespace, positive: Sequence[str] = ()) -> RayOptions | None:
    """Check the common options before any work; returns the Ray options (None: no Ray).

    ``positive`` names further integer options (``dest`` names) that must be >= 1 when given;
    ``--batch-size`` and ``--image-size`` always are. ``--seed`` must lie in
    ``[0, SEED_MAX]``; ``--image-size`` only with ``folder:``/``imagenet-s:`` data (the
    built-in data keep their sizes). ``args.alpha`` is replaced by the checked value (a float or
    ``"auto"``; None stays None).

    Raises
    ------
    UsageError, ValueError
        One line naming the option and what is allowed.
    """
    from quantus_adapters.benchmark.protocol import check_alpha

    for name in ("batch_size", "image_size", *positive):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.image_size is not None and not args.data.startswith(("folder:", "imagenet-s:")):
        # the built-in data have fixed sizes: the option would be ignored without a word
        raise UsageError(f"--image-size resizes the images of --data folder:PATH or "
                         f"imagenet-s:PATH; those of --data {args.data} keep their size (drop "
                         "--image-size)")
    check_seed(args.seed)
    if args.alpha is not None:
        args.alpha = check_alpha(args.alpha, "--alpha")
    return RayOptions.from_args(args, args.device)


def check_seed(seed: int) -> None:
    """Refuse a ``--seed`` outside ``[0, SEED_MAX]``.

    Raises
    ------
    UsageError
        One line naming ``--seed`` and the valid range.
    """
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be an integer from 0 to {SEED_MAX} (2**32 - 1), got "
                         f"{seed}")


def print_warnings(prog: str, warnings: Sequence[str]) -> None:
    """Print each of ``warnings`` on stderr as ``PROG: note: ...``."""
    for warning in warnings:
        print(f"{prog}: note: {warning}", file=sys.stderr)


def check_device(device: str) -> None:
    """Refuse a torch device this process cannot use (one line naming it)."""
    if device == "cpu":
        return
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise UsageError(f"--device {device!r} is not usable: {exc}") from exc


def check_methods(names: Sequence[str]) -> list[str]:
    """``--methods`` names, each offered by exactly one installed plugin.

    Raises
    ------
    UsageError
        No name (``--methods ''``), an unknown name (the message lists the available
        methods) or one that two plugins offer.
    """
    from quantus_adapters.registry import PluginError, UnknownMethodError, method_info

    if not names:
        from quantus_adapters.registry import available_methods

        raise UsageError("--methods names no method; give one or more of "
                         f"{', '.join(sorted(available_methods()))}")
    for name in names:
        try:
            method_info(name)
        except (UnknownMethodError, PluginError) as exc:
            raise UsageError(f"--methods: {exc}") from None
    return list(names)


def input_channels(model: nn.Module, data: str) -> int:
    """1 or 3: the channels of the model's first convolution (3 without a convolution).

    Raises
    ------
    UsageError
        The model takes another number of channels.
    """
    from quantus_adapters.benchmark.images import model_channels

    channels = model_channels(model)
    if channels is None:
        return 3
    if channels not in (1, 3):
        raise UsageError(f"the model's first layer takes {channels} channels; --data {data} "
                         "is read as 1 (grayscale) or 3 (RGB) channels -- give a model that "
                         "takes 1 or 3")
    return channels


def check_data_channels(channels: int, images: torch.Tensor, data: str) -> None:
    """Refuse loaded images whose channels are not the model's (``--data digits`` is gray)."""
    if images.shape[1] != channels:
        raise UsageError(f"the model's first layer takes {channels} channel(s) but --data "
                         f"{data} has {images.shape[1]}; use a matching model")


def check_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     names: Sequence[str], device: str, data: str) -> int:
    """Run the model on the first image; returns its number of classes.

    Raises
    ------
    UsageError
        The model fails on the images, does not return (batch, classes) logits, returns a
        non-finite output on the first image (naming the tensors that hold NaN or inf), or a
        label lies outside its classes (the message names the image).
    """
    with torch.no_grad():
        try:
            out = model(images[:1].to(device))
        except Exception as exc:
            raise UsageError(f"the model cannot process the data ({data}, images of shape "
                             f"{tuple(images.shape[1:])}): {type(exc).__name__}: "
                             f"{exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"the model returns a {type(out).__name__}, not a tensor; a "
                         "classifier returning (batch, classes) logits is needed (wrap the "
                         "model so that its forward returns the logits alone)")
    if out.ndim != 2:
        raise UsageError(f"the model's output has shape {tuple(out.shape)}; a classifier "
                         "returning (batch, classes) logits is needed")
    if not bool(torch.isfinite(out).all()):
        broken = [n for n, t in (*model.named_parameters(), *model.named_buffers())
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        where = (f"its tensors {broken[:3]} hold NaN or inf; load other weights" if broken
                 else "check the model and the data")
        raise UsageError(f"the model's output on {names[0]!r} is not finite (NaN or inf), "
                         f"so no map of it could be: {where}")
    n_classes = out.shape[1]
    bad = (labels < 0) | (labels >= n_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if int(labels[i]) < 0:
            raise UsageError(f"label {int(labels[i])} of {names[i]!r} is negative; labels are "
                             "class indices of the model's output (0, 1, ...)")
        raise UsageError(f"label {int(labels[i])} of {names[i]!r} is out of the model's "
                         f"range [0, {n_classes})")
    return n_classes


# ----------------------------------------------------------------------------- the frame
def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(prog: str, args: argparse.Namespace, body: Callable[[argparse.Namespace], int], *,
        kept: str, threads: int | None = None) -> int:
    """Run ``body(args)`` with the exit codes of the module docstring.

    Parameters
    ----------
    prog: str
        The command's name in error lines (``"splitxai benchmark"``).
    args: argparse.Namespace
        The parsed options (``--threads`` and ``--debug`` are read here).
    body: callable
        The command; returns its exit status (0 or 1).
    kept: str
        Where the finished work is and how to continue, printed after "interrupted; " on
        SIGINT / SIGTERM and after a Ray worker's setup error.
    threads: int, optional
        Torch CPU threads when ``--threads`` is not given (None: torch's choice).

    Torch's thread count and the SIGTERM handler are restored afterwards.
    """
    saved_threads = torch.get_num_threads()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        n_threads = args.threads if args.threads is not None else threads
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        return body(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerSetupError as exc:  # found after work began: the finished work is kept
        if args.debug:
            raise
        print(f"{prog}: error: {one_line(exc)}; {kept}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)} (run again "
              "with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(saved_threads)
