"""Argument handling of the Captum attributions of :mod:`captum_split`.

The checks themselves (options, targets, layer names) are those of :mod:`core.checks`; this
module holds Captum's conventions around them (wrapped models, tuple inputs, additional
forward arguments) and runs before any forward or backward pass.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from core import checks
from core.capture import selector, unwrap, wrapped_module
from core.errors import caller
from core.explaining import eval_semantics

STREAMS = ("g", "h")
SIGNS = (None, "+", "-")


def owner_module(forward_func: Callable[..., Any]) -> nn.Module | None:
    """The ``nn.Module`` that ``forward_func`` is or is bound to (any bound method of a
    module counts), else None: the model whose flags and buffers an explanation keeps."""
    owner = getattr(forward_func, "__self__", forward_func)
    return owner if isinstance(owner, nn.Module) else None


def eval_context(forward_func: Callable[..., Any],
                 stacklevel: int) -> AbstractContextManager[Any]:
    """:func:`core.explaining.eval_semantics` for the module behind ``forward_func`` (a
    do-nothing context for a plain function): a model in training mode is explained with
    eval semantics (warned once per model) and keeps its flags and buffers bit for bit.

    ``stacklevel`` is that of :func:`~core.explaining.eval_semantics`: 3 names the line of
    the ``with`` statement, each further frame up to the user's call adds one.
    """
    owner = owner_module(forward_func)
    if owner is None:
        return contextlib.nullcontext()
    return eval_semantics(owner, stacklevel=stacklevel)


def model_of(forward_func: Callable[..., Any]) -> nn.Module | None:
    """The ``nn.Module`` that ``forward_func`` is (or whose bound ``forward`` / ``__call__`` it
    is), wrappers included; None for any other callable."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(forward_func, "__name__", "") in (
        "forward",
        "__call__",
    ):
        return owner
    return None


def unwrap_model(forward_func: Callable[..., Any], method: str) -> nn.Module:
    """Return the ``nn.Module`` behind ``forward_func``.

    Accepts a module, a ``torch.compile`` (``OptimizedModule``, its ``._orig_mod``),
    ``DataParallel`` or ``DistributedDataParallel`` wrapper (its ``.module``; warned once, by
    :func:`core.capture.unwrap`) or a module's bound ``forward`` method. The split methods need
    the module itself because the split pair is built from its submodules.

    Raises
    ------
    TypeError
        If ``forward_func`` is any other callable.
    core.UnsupportedOperation
        For a model that cannot be split at all (TorchScript, ``torch.export``), its
        message prefixed with ``method``.
    """
    model = model_of(forward_func)
    if model is None:
        raise TypeError(
            f"{method} needs the model itself as forward_func (a torch.nn.Module), because "
            f"the split pair g, h is built from its submodules; got "
            f"{type(forward_func).__name__}. Pass the nn.Module whose output holds the "
            "class scores (wrap any post-processing into a small nn.Module)."
        )
    with caller(method):  # TorchScript, torch.export, meta-device and lazy models
        return unwrap(model)


def resolve_layer(
    forward_func: Callable[..., Any],
    layer: nn.Module | str | None,
    method: str,
    *,
    allow_input: bool = False,
    allow_elements: bool = False,
) -> tuple[nn.Module | None, str | None]:
    """The model behind ``forward_func`` and the name of ``layer`` in it: the one way every
    Captum adapter (SplitCAM, SplitGrad, LayerCAM, GradCAMPlusPlus, the plugin) reads a layer.

    The model is the module inside any ``torch.compile`` / ``DataParallel`` / DDP wrappers
    (:func:`core.capture.wrapped_module`, no warning). A name is looked up in it, either as
    in its ``named_modules()`` (``"layer2"``) or as in the wrapper's (``"_orig_mod.layer2"``,
    ``"module.layer2"``); a module is found by identity.

    Parameters
    ----------
    forward_func : callable
        The model, a wrapper of it, its bound ``forward``, or (for a ``layer`` given as a
        module only) any function.
    layer : :py:class:`torch.nn.Module`, str or None
        The layer, checked by :func:`core.checks.layer_name`.
    method : str
        The caller, prefixed to messages.
    allow_input : bool
        Whether ``None`` / ``"input"`` (the model input) is admissible.
    allow_elements : bool
        Whether ``"NAME:i"`` (element ``i`` of a module's tuple output) is admissible.

    Returns
    -------
    tuple
        ``(model, name)``; ``(None, None)`` for a function that is no module, with a
        ``layer`` module (which then cannot be checked).

    Raises
    ------
    TypeError
        For a name with a ``forward_func`` that is no module, and for a ``layer`` of another
        type.
    ValueError
        For a layer that is not part of the model (with close names); a name given under
        the wrapper's prefix is reported as typed (``"_orig_mod.conv3"``), its close names
        under the prefix too.
    """
    owner = model_of(forward_func)
    if owner is None:
        if isinstance(layer, nn.Module):
            return None, None
        if isinstance(layer, str):
            raise TypeError(
                f"{method}: a layer given by name needs forward_func to be the nn.Module; pass "
                "the layer module instead."
            )
        raise TypeError(
            f"{method}: layer must be a torch.nn.Module or a module name; got "
            f"{type(layer).__name__}."
        )
    model, prefix = wrapped_module(owner)
    if isinstance(layer, str) and prefix and layer not in checks.INPUT_NAMES:
        names = dict(model.named_modules())
        base, _, suffix = layer.rpartition(":")
        base = base if suffix.isdigit() else layer
        if base not in names:
            if layer == prefix:
                layer = model  # refused by name: the model itself
            elif layer.startswith(prefix + "."):
                inner = layer[len(prefix) + 1:]
                if inner not in checks.INPUT_NAMES and not checks.names_a_layer(
                        names, inner, allow_elements):  # reported as typed, with the prefix
                    raise checks.unknown_layer(model, layer, method, allow_input, prefix)
                layer = inner
    return model, checks.layer_name(model, layer, method, allow_input=allow_input,
                                    allow_elements=allow_elements)


def split_element(model: nn.Module, name: str) -> tuple[str, int | None]:
    """``("NAME", i)`` for an element name ``"NAME:i"`` of ``model`` (as
    :func:`resolve_layer` returns it), else ``(name, None)``."""
    base, _, suffix = name.rpartition(":")
    if suffix.isdigit() and name not in dict(model.named_modules()):
        return base, int(suffix)
    return name, None


def element_input_error(name: str, method: str) -> ValueError:
    """The error for ``attribute_to_layer_input=True`` with an element name ``"NAME:i"``."""
    base = name.rpartition(":")[0]
    return ValueError(
        f"{method}: attribute_to_layer_input=True explains the input of a module, but "
        f"{name!r} is an element of the output of {base!r}; pass layer {base!r} to explain "
        f"its input, or attribute_to_layer_input=False to explain {name!r}."
    )


#: the modules a CAM's default layer may be (their lazy and QAT variants subclass them)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def last_conv_name(model: nn.Module, method: str,
                   run: Callable[[], Any] | None = None) -> str:
    """Name of the last ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` in
    ``model.named_modules()`` order (the CAM default).

    With ``run`` (a forward of the model on the inputs to explain, which this calls under
    ``torch.no_grad()`` with eval semantics), the last of those that the forward calls: a
    convolution that never runs in eval mode (GoogLeNet's ``aux2``, Inception-v3's
    ``AuxLogits``: defined after the main path, called only in training) has no activation
    to explain. Of those, the last one with more than one spatial position in its output,
    when there is one: a classifier written as a 1x1 convolution on the pooled features
    (timm's DLA ``fc``, DPN ``classifier``) outputs ``(B, C, 1, 1)`` and gives a map
    constant over each image. A forward that raises leaves the choice to
    ``named_modules()`` order (the explainer then reports the error).
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONVOLUTIONS)]
    if not convs:
        raise ValueError(
            f"{method}: the model has no convolution, so there is no default layer; pass "
            "layer=<module name>."
        )
    if run is None or len(convs) == 1:
        return convs[-1][0]
    called: dict[str, int] = {}  # name: the most spatial positions of an output

    def hook(name: str, output: Any) -> None:
        size = output.shape[2:].numel() if isinstance(output, Tensor) else 0
        called[name] = max(called.get(name, 0), size)

    handles = [m.register_forward_hook(lambda _m, _i, out, name=n: hook(name, out))
               for n, m in convs]
    try:
        with torch.no_grad(), eval_semantics(model, warn=False):
            run()
    except Exception:  # noqa: BLE001 - the explainer's own forward reports it
        return convs[-1][0]
    finally:
        for handle in handles:
            handle.remove()
    ran = [n for n, _ in convs if n in called]
    spatial = [n for n in ran if called[n] > 1]
    return spatial[-1] if spatial else ran[-1] if ran else convs[-1][0]


def input_tensors(inputs: Any, method: str, floating: bool = True) -> tuple[Tensor, ...]:
    """Captum's inputs (a tensor or a tuple of tensors) as a tuple, refusing anything else.

    Parameters
    ----------
    inputs : :py:class:`torch.Tensor` or tuple of them
        What the user passed.
    method : str
        The caller, prefixed to messages.
    floating : bool
        Refuse tensors that are not floating-point (the split methods, which split the input
        itself); False for the methods on Captum's machinery (LayerCAM, Grad-CAM++), which
        take what the model takes (token ids, uint8 images), as ``LayerGradCam``.

    Raises
    ------
    TypeError
        For a NumPy array or any other non-tensor (with the conversion to use), and, with
        ``floating``, for non-floating tensors and sparse or MKL-DNN ones (not strided).
    ValueError
        For an empty tuple, a tensor without a batch dimension or with an empty batch.
    """
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    if not items:
        raise ValueError(f"{method}: inputs is an empty tuple; pass the model input tensor.")
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            hint = " (torch.from_numpy(x), or torch.as_tensor(x))" if type(item).__module__ \
                == "numpy" else ""
            raise TypeError(
                f"{method}: inputs must be a torch.Tensor or a tuple of them, as in Captum; got "
                f"{type(item).__module__}.{type(item).__name__}. Pass a torch.Tensor{hint}."
            )
        if floating and not item.is_floating_point():
            raise TypeError(
                f"{method}: inputs must be floating-point tensors, since the split divides "
                f"the input into x+ - x-; got {item.dtype}. Pass x.float(), or pass integer "
                "tensors (token ids, masks) through additional_forward_args; LayerCAM and "
                "GradCAMPlusPlus explain models of integer inputs."
            )
        if floating and item.layout != torch.strided:  # else a page-long NotImplementedError
            raise TypeError(
                f"{method}: inputs must be dense tensors, since the split divides the input "
                f"into x+ - x- elementwise; got layout {item.layout}. Pass x.to_dense()."
            )
        if item.dim() < 2:
            raise ValueError(
                f"{method}: inputs must have a batch dimension first, e.g. (B, C, H, W); got "
                f"shape {tuple(item.shape)}."
            )
        checks.batch_size(item, "inputs" if len(items) == 1 else f"inputs[{i}]", method)
    return items


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (None if it has none)."""
    # lazily: the first floating-point tensor ends the walk over the module tree
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _dtype_mismatch(items: tuple[Tensor, ...], model: nn.Module | None,
                    method: str) -> TypeError | None:
    """The one message for an input whose dtype is not the model's (None where all match):
    which tensor, both dtypes and the conversion to pass."""
    dtype = None if model is None else model_dtype(model)
    if dtype is None:
        return None
    for i, x in enumerate(items):
        if x.dtype != dtype:
            which = "inputs" if len(items) == 1 else f"inputs[{i}]"
            copy = (f" or explain a copy of the model in {x.dtype} "
                    f"(copy.deepcopy(model).to({x.dtype}))" if x.is_floating_point() else "")
            return TypeError(
                f"{method}: {which} is {x.dtype} but the model's parameters are {dtype}; pass "
                f"x.to({dtype}){copy}."
            )
    return None


def check_dtype(items: tuple[Tensor, ...], model: nn.Module | None, method: str) -> None:
    """Raise ``TypeError`` naming both dtypes if an input's dtype is not the model's.

    For the split methods, which split the input itself before any forward: PyTorch would
    fail later with "expected scalar type Double but found Float" deep in the first layer;
    this says which tensor to convert.
    """
    err = _dtype_mismatch(items, model, method)
    if err is not None:
        raise err


#: the words of PyTorch's errors for operands of different dtypes ("Input type (double)
#: and bias type (float) should be the same", "mat1 and mat2 must have the same dtype",
#: "expected scalar type Double but found Float")
_DTYPE_ERROR = re.compile(r"\btypes?\b.*\bsame\b|\bsame dtype\b|\bscalar type\b",
                          re.IGNORECASE)


@contextlib.contextmanager
def dtype_errors(items: tuple[Tensor, ...], model: nn.Module | None,
                 method: str) -> Iterator[None]:
    """Within it, PyTorch's ``RuntimeError`` for operands of different dtypes becomes the
    ``TypeError`` of :func:`check_dtype` (chained to it) when an input's dtype is not the
    model's.

    For the methods on Captum's machinery, which accept any input the model accepts (a
    model may cast its input itself, ``x.float() / 255``, or embed token ids): a mismatch is
    only known when the forward fails on it.
    """
    try:
        yield
    except RuntimeError as err:
        mismatch = _dtype_mismatch(items, model, method) \
            if _DTYPE_ERROR.search(str(err)) else None
        if mismatch is None:
            raise
        raise mismatch from err


def single_input(
    inputs: Tensor | tuple[Tensor, ...], method: str, model: nn.Module | None = None
) -> tuple[Tensor | tuple[Tensor, ...], bool]:
    """Return the input tensor (a tuple of them for several inputs, each split) and whether
    it was given as a tuple, after :func:`input_tensors` and :func:`check_dtype`."""
    items = input_tensors(inputs, method)
    check_dtype(items, model, method)
    return (items[0] if len(items) == 1 else tuple(items)), isinstance(inputs, tuple)


def check_grad_kwargs(grad_kwargs: dict[str, Any] | None, method: str) -> None:
    """Accept Captum's ``grad_kwargs`` only when empty: the split's backward passes are fixed.

    Captum forwards ``grad_kwargs`` to :py:func:`torch.autograd.grad`; the split pair's
    sensitivities come from several backward passes of :func:`core.split` whose options are
    not the user's to change, so a non-empty dict is refused rather than ignored.
    """
    if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
        raise TypeError(f"{method}: grad_kwargs must be a dict or None; got {grad_kwargs!r}.")
    if grad_kwargs:
        raise ValueError(
            f"{method}: grad_kwargs={grad_kwargs!r} is not supported: the split-pair "
            "sensitivities come from the split engine's own backward passes (their maps carry "
            "no autograd history). Pass grad_kwargs=None."
        )


def format_additional_args(additional_forward_args: Any) -> tuple[Any, ...]:
    """Captum's convention: ``None`` -> ``()``, a non-tuple -> a 1-tuple."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def checked_forward(
    forward_func: Callable[..., Any], target: Any, method: str
) -> Callable[..., Any]:
    """Wrap ``forward_func`` so that a target out of range, or ``(batch, classes)`` logits
    without one row per input row (:func:`core.checks.output_rows`), fail right after the
    forward.

    Captum's own check is an indexing error deep in autograd code; this raises a clear
    ``ValueError`` before any gradient is computed.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = forward_func(*args, **kwargs)
        if isinstance(out, Tensor) and out.dim() == 2 and target is not None:
            if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
                checks.output_rows(out, args[0].shape[0], method)
            if isinstance(target, tuple):
                return out
            if isinstance(target, list):
                idx = [t for t in target if isinstance(t, numbers.Integral)]
                if idx:
                    checks.target_range(max(int(t) for t in idx), out.shape[1], method)
            elif isinstance(target, Tensor) and target.numel() > 0:
                checks.target_range(target, out.shape[1], method)
            elif isinstance(target, numbers.Integral):
                checks.target_range(int(target), out.shape[1], method)
        return out

    return forward


#: the options of :func:`core.split` that SplitCAM and SplitGrad take under the same name
SPLIT_OPTIONS = ("output", "nonlinear", "reuse_capture", "maxpool", "stabilizer", "input_split")


def reword(message: str, method: str, layer: str | None) -> str:
    """``message`` with :mod:`core`'s advice in the words of the adapter ``method``.

    ``core.split(model, nonlinear='freeze')`` becomes ``SplitCAM(model, 'conv',
    nonlinear='freeze')`` (for an option in :data:`SPLIT_OPTIONS`, which the adapter takes
    under the same name; ``layer`` None: ``SplitGrad(model, ...)``), and "to core.split"
    / "core.split also takes" name the adapter.
    """
    head = f"{method}(model, " if layer is None else f"{method}(model, {layer!r}, "
    options = "|".join(SPLIT_OPTIONS)
    message = re.sub(rf"core\.split\(model, (?=(?:{options})=)", lambda _: head, message)
    return re.sub(r"\bcore\.split(?= also takes|[ ,.]|$)(?!\()", method, message)


@contextlib.contextmanager
def adapter_words(method: str, layer: str | None) -> Iterator[None]:
    """:func:`core.errors.caller` (``"method: "`` in front of every error message, type and
    arguments kept) with core's advice reworded for the adapter (:func:`reword`)."""
    try:
        with caller(method):
            yield
    except Exception as err:
        if err.args and isinstance(err.args[0], str):
            err.args = (reword(err.args[0], method, layer), *err.args[1:])
        raise


def one_score(output: Any, method: str) -> Callable[[Any], Any]:
    """An ``output=`` selector for ``target=None``: the model's score tensor (picked by the
    user's ``output``) as ``(B, 1)``, refusing an output with several scores per row.

    Captum's ``LayerGradCam`` accepts ``target=None`` for a model with one score per example,
    a ``(B,)`` or ``(B, 1)`` output; the split explains column 0 of ``(B, 1)``.
    """
    pick = selector(output)

    def score(value: Any) -> Tensor:
        out = pick(value) if pick is not None else value
        if not isinstance(out, Tensor):  # a dict or tuple: core asks for output= itself
            return out
        if out.dim() == 1:
            return out.unsqueeze(1)
        if out.dim() == 2 and out.shape[1] == 1:
            return out
        raise ValueError(
            f"{method}: target=None explains a model with one score per row, a (B,) or "
            f"(B, 1) output; this one is {tuple(out.shape)}. Pass target= (the class index "
            "whose score is explained: an int, or one per input row)."
        )

    return score
