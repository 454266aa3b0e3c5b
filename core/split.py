"""The split pair of a model: ``core.split(model)`` and :class:`SplitModel`."""

from __future__ import annotations

import gc
import operator
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core import checks, reuse
from core.absops import SCRATCH
from core.capture import EXPORT_FIX, Capture, Captured, exported, find, unwrap
from core.errors import (
    SeveralInputsError,
    SplitOverflowError,
    SplitPrecisionWarning,
    UnsupportedOperation,
    WarnedModels,
    precision_advice,
)
from core.explaining import autocast_off, eval_semantics, refuse_backward_hooks
from core.interpreter import SplitInterpreter
from core.pair import Pair
from core.probes import Probe
from core.record import argument_tensors, grad_off
from core.shift import (
    DEFAULT_ALPHA,
    AlphaType,
    Shift,
    alpha_label,
    check_alpha,
    warn_if_class_blind,
)

MAXPOOL_MODES = ("convex", "wta")
STABILIZERS = ("scale", "shift", "none")
INPUT_SPLITS = ("relu", "half")
NONLINEAR_MODES = ("error", "freeze")
#: ``g - h`` must carry the output to this fraction of ``max |f|`` per row, else
#: :class:`SplitPrecisionWarning`.
CARRIES = 1e-3
_IMPRECISE = WarnedModels()  # models warned about
_FROZE = WarnedModels()  # models (and the operations frozen) warned about

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while the body runs: capturing a model makes
    thousands of objects that live on (graph nodes, plans), and in a process that holds many
    objects (torch, timm, Captum imported) the collections that they trigger cost more than
    the capture itself (ResNet50: 2-5 ms of its first split). The objects are collected as
    usual afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass
class SplitCall:
    """One call of the split: the captured graph for its inputs and the interpreter.

    Attributes
    ----------
    model: torch.nn.Module
        The model.
    captured: core.capture.Captured
        The graph for this call's input signature.
    interpreter: core.interpreter.SplitInterpreter
        Runs the graph on split pairs.
    inputs: tuple of torch.Tensor
        The split inputs.
    extra: list
        The values of the graph's further placeholders.
    elements: dict
        For each ``"NAME:i"`` that :meth:`node_of` resolved to the graph's ``out[i]`` of a
        module output node ``out``: that node (checked by :meth:`check_values`).
    """

    model: nn.Module
    captured: Captured
    interpreter: SplitInterpreter
    inputs: tuple[torch.Tensor, ...]
    extra: list
    elements: dict[fx.Node, fx.Node] = field(default_factory=dict)

    def node_of(self, layer: str, who: str | None = None) -> fx.Node | tuple[fx.Node, ...]:
        """The node (or, for a tuple output or several inputs, nodes) of a layer name.

        ``who`` (an adapter, ``"SplitCAM"``) is prefixed to the messages, which then ask
        for a ``layer`` to pass rather than a name to probe (:func:`_ask`).

        ``"NAME:i"`` is element ``i`` of a module's tuple output: one of the nodes of a
        module whose output the capture holds as a tuple of nodes, else the graph's
        ``out[i]`` of its output node ``out`` (a tuple-valued node, such as a leaf module
        returning a tuple or a forward returning ``x.chunk(2, 1)``; :meth:`check_values`
        checks after the run that it was a tuple).

        Raises
        ------
        ValueError
            For a name that is not a module, a module the forward never calls with the
            input, or an element that the forward never takes out of the module's output.
        """
        cap = self.captured
        inputs = cap.input_nodes()
        if layer in ("", "input"):
            return inputs[0] if len(inputs) == 1 else tuple(inputs)
        base, _, suffix = layer.rpartition(":")
        if base == "input" and suffix.isdigit() and int(suffix) < len(inputs):
            return inputs[int(suffix)]
        if suffix == "input" and base in cap.module_inputs:
            node = cap.module_inputs[base]
            if isinstance(node, tuple):
                sources = tuple(self.describe(n) for n in node)
                raise SeveralInputsError(
                    f"{checks.prefix(who)}layer {layer!r}: module {base!r} is called with "
                    f"{len(node)} tensors that depend on the input ({', '.join(sources)}), so "
                    f"it has no single input; "
                    f"{_ask(who, 'where they are computed', 'a layer where they are computed')}"
                    f", or the module's output {base!r}", base, sources)
            return node
        if layer in cap.module_outputs:
            return cap.module_outputs[layer]
        if suffix.isdigit() and isinstance(cap.module_outputs.get(base), tuple):
            parts = cap.module_outputs[base]
            if int(suffix) < len(parts):
                return parts[int(suffix)]
            raise ValueError(
                f"{checks.prefix(who)}layer {layer!r}: {base!r} outputs a tuple of "
                f"{len(parts)} values, it has no element {suffix}; "
                f"{_ask(who, ', '.join(repr(f'{base}:{i}') for i in range(len(parts))))}")
        if suffix.isdigit() and isinstance(cap.module_outputs.get(base), fx.Node):
            out, i = cap.module_outputs[base], int(suffix)
            element = next((u for u in out.users if u.op == "call_function"
                            and u.target is operator.getitem and u.args[1:] == (i,)), None)
            if element is None:
                raise ValueError(
                    f"{checks.prefix(who)}layer {layer!r} names element {i} of the output of "
                    f"{base!r}, but the forward never takes that element out on its own "
                    f"({base}(...)[{i}]); {_ask(who, repr(base))} or a module that reads the "
                    "element"
                )
            self.elements[element] = out
            return element
        known = [n for n, _ in self.model.named_modules()]
        name = base if suffix == "input" or suffix.isdigit() else layer
        if name in known:
            if suffix == "input":  # called with no tensor, or with several
                raise ValueError(
                    f"{checks.prefix(who)}the input of layer {name!r} is not one tensor that "
                    "depends on the model's input (it may be a list or tuple of tensors, or "
                    "never be called); explain the output of the modules that make that "
                    "input, or the layer's output"
                )
            raise ValueError(
                f"{checks.prefix(who)}layer {layer!r} is a module of the model, but its "
                "forward never calls it with a tensor that depends on the input"
            )
        raise checks.unknown_layer(self.model, name, who, allow_input=True)

    def check_values(self, nodes: Mapping[str, Any], records: Mapping[fx.Node, Any],
                     who: str | None = None) -> None:
        """Raise ``ValueError`` for a probed name whose value is not one tensor.

        Parameters
        ----------
        nodes: mapping
            Layer name to its node(s), from :meth:`node_of`.
        records: mapping
            The values of a run that recorded those nodes and :attr:`elements`.
        who: str, optional
            The caller, prefixed to the messages (as for :meth:`node_of`).

        Raises
        ------
        ValueError
            For a module whose output is a tuple, probed by its bare name (the message lists
            ``"NAME:0"``, ``"NAME:1"``...), and for ``"NAME:i"`` of a module whose output is
            one tensor (``out[i]`` is then a slice of it, not an element of a tuple).
        """
        for layer, node in nodes.items():
            parts = node if isinstance(node, tuple) else (node,)
            for n in parts:
                value = records.get(n)
                if isinstance(value, (tuple, list)):
                    raise checks.tuple_output(layer, _activations(layer, value), len(value),
                                              who)
                if not isinstance(value, Pair):
                    if len(parts) > 1:  # a tuple output (held as nodes) with a non-activation
                        values = [records.get(m) for m in parts]
                        raise checks.tuple_output(layer, _activations(layer, values),
                                                  len(parts), who)
                    what = (f"is a {type(value).__name__} that the split does not carry as a "
                            "pair" if n in records else "holds no value that the output depends on")
                    raise ValueError(
                        f"{checks.prefix(who)}layer {layer!r} {what} (e.g. pooling indices), "
                        f"not an activation; {_ask(who, 'an activation', 'a layer that is one')}"
                    )
                source = self.elements.get(n)
                if source is not None and isinstance(records.get(source), Pair):
                    base = layer.rpartition(":")[0]
                    raise ValueError(
                        f"{checks.prefix(who)}layer {layer!r}: {base!r} outputs one tensor, "
                        f"not a tuple, and {layer!r} would be its slice "
                        f"{base}(...)[{layer.rpartition(':')[2]}]; {_ask(who, repr(base))}"
                    )

    def describe(self, node: fx.Node) -> str:
        """The module name of a node, or the graph node."""
        for name, value in self.captured.module_outputs.items():
            if name and value is node:
                return repr(name)
        return f"graph node {node.name!r}"


class SplitModel:
    """A trained piecewise-linear model as its split pair ``(g, h)`` with ``g - h = f``.

    A view of the model: no weight is copied and the model is never modified. Build it with
    :func:`core.split`.

    Parameters
    ----------
    model: torch.nn.Module
        The model ``f`` (``torch.compile``, ``DataParallel`` and DDP wrappers are split
        through the module they wrap).
    maxpool: str
        ``"convex"`` (section 3.4, keeps g and h convex and monotone) or ``"wta"``
        (winner-takes-all: the pair at the position where the activation is largest).
    stabilizer: str
        Forward stabilisation after each ReLU-type unit: ``"scale"`` (multiply ``s`` by
        ``theta`` for every sample whose largest ``|a+|``/``|a-|`` exceeds ``threshold``),
        ``"shift"`` (reset such samples to ``(d / 2, -d / 2)``; ``threshold=0`` makes it
        unconditional, the paper's C.2 baseline) or ``"none"``. Stabilisers change the split
        activations only, never the sensitivities.
    input_split: str
        ``"relu"``: ``x+ = relu(x)``, ``x- = relu(-x)``; ``"half"``: ``x+ = x / 2 = -x-``.
    merge_batchnorm: bool
        Treat a BatchNorm that directly follows a Linear/Conv (its only user) as merged into
        it: the pair's bias is ``|k b + beta|`` instead of ``k |b| + |beta|``. Changes ``s``
        only.
    theta: float
        Scaling factor of the ``"scale"`` stabiliser (the paper's minimise factor), in
        ``(0, 1]``.
    threshold: float
        The threshold ``Theta`` of the stabilisers, ``>= 0``. A NaN ``theta`` or
        ``threshold`` (like any option outside its range) is refused with a ``ValueError``
        (:func:`core.checks.number`).
    cache_abs_weights: bool
        Keep ``|W|`` of every affine layer between calls (more memory: a copy of those
        weights; less time). The cache is refreshed when a parameter is replaced or changed
        in place by torch (an optimiser step, ``load_state_dict``, ``w.mul_()`` under
        ``no_grad``: its version counter moves); a change through ``w.data`` bypasses the
        version counter and is not seen: split the model again after one.
    output: int, str or callable, optional
        For a model whose output is a tuple, dict or dataclass: the index, key/attribute or
        function that picks the tensor to split (the logits).
    nonlinear: str
        What to do with operations that are not piecewise linear (SiLU, GELU, sigmoid and
        softmax gates, attention, LayerNorm/GroupNorm/RMSNorm, division by an activation):
        ``"error"`` (default) raises :class:`core.UnsupportedOperation`; ``"freeze"`` splits
        them with their data-dependent factor frozen at the model's activation (see
        :mod:`core.frozen`), warns (once per model and list of frozen operations, so that
        splitting an unchanged model again is silent) and lists them in
        :meth:`frozen_operations`. ``g - h``
        stays exact; the sensitivities are those of the frozen model. Products of
        activations are split exactly in both modes (:mod:`core.products`).
    reuse_capture: bool
        Reuse what an earlier split of the same, unchanged model object captured (graphs and
        plans; :mod:`core.reuse`), so that splitting a model again costs a fingerprint of it
        instead of a trace. The fingerprint covers the module tree, module attributes,
        parameter and buffer shapes, hooks and the modules' classes; it does not see a
        forward that reads a global variable or an object changed in place -- pass False
        for such a model. The split is a view of the model as it was at ``core.split``:
        after changing the model, split it again. Also keyed by ``output`` when that is an
        index or key (a callable is not kept).
    """

    def __init__(
        self,
        model: nn.Module,
        maxpool: str = "convex",
        stabilizer: str = "scale",
        input_split: str = "relu",
        merge_batchnorm: bool = False,
        theta: float = 0.1,
        threshold: float = 10.0,
        cache_abs_weights: bool = False,
        output: Any = None,
        nonlinear: str = "error",
        reuse_capture: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}"
                            + (f". {EXPORT_FIX}" if exported(model) else ""))
        self.maxpool = checks.option("maxpool", maxpool, MAXPOOL_MODES)
        self.stabilizer = checks.option("stabilizer", stabilizer, STABILIZERS)
        self.input_split = checks.option("input_split", input_split, INPUT_SPLITS)
        self.nonlinear = checks.option("nonlinear", nonlinear, NONLINEAR_MODES)
        self.theta = checks.number("theta", theta, 0.0, 1.0, low_open=True)
        self.threshold = checks.number("threshold", threshold, 0.0)
        self.merge_batchnorm = bool(merge_batchnorm)
        self._abs_cache: dict[int, tuple[int, int, torch.Tensor]] | None = (
            {} if cache_abs_weights else None
        )
        self.model = unwrap(model)
        # by (captured graph, thread): an interpreter holds the state of its run (torch.fx's
        # env, the records, the nodes free of mass that SplitLRP's rules read afterwards), so
        # each thread runs its own (shared, two threads failed with torch.fx's
        # "KeyError: input_1" or mixed their relevance); a thread's first call plans anew
        self._interpreters: dict[tuple[int, int], tuple[Captured, SplitInterpreter]] = {}
        with _collector_paused():
            self.capture = self._capture(output, bool(reuse_capture))
            if self.capture.symbolic is not None:  # unsupported operations fail here
                self._interpreter(self.capture.symbolic, shared=True)

    def _capture(self, output: Any, reuse_capture: bool) -> Capture:
        """The capture: what an earlier split of the unchanged model found
        (:mod:`core.reuse`), else a new one (kept for the next split)."""
        key = reuse.output_key(output) if reuse_capture else None
        if key is None:  # tracing runs on an eval-mode twin of the model (core.graph)
            return Capture(self.model, output)
        fingerprint = reuse.Fingerprint(self.model)
        entry = reuse.entry(self.model, fingerprint)
        found = entry.found.get(key)
        if found is None:
            found = entry.found[key] = find(self.model)
        model = self.model

        def shared() -> bool:
            return entry.matches(reuse.Fingerprint(model))

        return Capture(self.model, output, found, shared)

    # ------------------------------------------------------------------ capture
    def _interpreter(self, captured: Captured, shared: bool = False) -> SplitInterpreter:
        """The interpreter of a captured graph (``shared``: the model is known to be
        unchanged since the capture was kept, so a new plan may be kept with it)."""
        key = (id(captured), threading.get_ident())
        hit = self._interpreters.get(key)
        if hit is not None and hit[0] is captured:
            return hit[1]
        keep = captured.reusable and (shared or self.nonlinear in captured.plans
                                      or self.capture.shareable())
        interp = SplitInterpreter(
            self.model, captured.graph, captured.inputs, maxpool=self.maxpool,
            stabilizer=self.stabilizer, theta=self.theta, threshold=self.threshold,
            merge_batchnorm=self.merge_batchnorm, weight_abs=self._weight_abs,
            cached_abs=self._abs_cache is not None, scratch=SCRATCH,
            nonlinear=self.nonlinear, plans=captured.plans if keep else None,
        )
        listed = interp.frozen_operations()
        if listed and (self.model, tuple(listed)) not in _FROZE:
            _FROZE.add(self.model, tuple(listed))
            more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
            warnings.warn(
                f"core.split froze {len(listed)} non-piecewise-linear operation(s) of "
                f"{type(self.model).__name__} at the model's activations (nonlinear='freeze'): "
                f"{'; '.join(listed[:5])}{more}. g - h equals the model's output exactly; the "
                "sensitivities are those of the frozen model (see sm.frozen_operations()).",
                stacklevel=4,
            )
        if captured.reusable:
            self._interpreters[key] = (captured, interp)
        return interp

    def prepare(self, x: Inputs, extra_args: Sequence[Any] = (),
                kwargs: Mapping[str, Any] | None = None, backward: bool = False) -> SplitCall:
        """Check the inputs and capture the graph of this call.

        Parameters
        ----------
        x: torch.Tensor or tuple of torch.Tensor
            The input(s) to split.
        extra_args, kwargs:
            Further positional and keyword arguments of the model's forward (not split).
        backward: bool
            For a backward pass (sensitivities, relevance): a model with backward hooks is
            refused (:func:`core.explaining.refuse_backward_hooks`), and so is a forward
            that computes a value on the path from the input to the output with gradients
            off (:attr:`core.capture.Captured.stop_gradient`).

        Returns
        -------
        SplitCall
        """
        inputs = self.check_input(x)
        if backward:
            refuse_backward_hooks(self.model)
        extra, kwargs = tuple(extra_args), dict(kwargs or {})
        with eval_semantics(self.model, warn=False, buffers=False):
            captured = self.capture.get(inputs, extra, kwargs)
        if backward and captured.stop_gradient is not None:
            raise grad_off(captured.stop_gradient)
        interp = self._interpreter(captured)
        if captured.mechanism == "symbolic":
            values = list(extra)
        else:
            values = argument_tensors(extra, kwargs)
        return SplitCall(self.model, captured, interp, inputs, values)

    # ------------------------------------------------------------------ names
    def layer_names(self, x: Inputs | None = None, *extra_args: Any) -> list[str]:
        """Names that :meth:`sensitivities` accepts (module names, ``"input"``); a model
        that is captured eagerly needs an input ``x``."""
        return self._call_for_names(x, extra_args).captured.layer_names()

    def frozen_operations(self, x: Inputs | None = None, *extra_args: Any) -> list[str]:
        """The operations that ``nonlinear="freeze"`` froze, in graph order, each with what
        is frozen (empty: the split is exact everywhere); a model that is captured eagerly
        needs an input ``x``."""
        return self._call_for_names(x, extra_args).interpreter.frozen_operations()

    def shift_points(self, x: Inputs | None = None, *extra_args: Any) -> list[str]:
        """Names of the alpha-shift points: ``"input"``, ReLU-type units, ``"output"``."""
        return self._call_for_names(x, extra_args).interpreter.shift_points()

    def _call_for_names(self, x: Inputs | None, extra_args: tuple) -> SplitCall:
        if x is not None:
            return self.prepare(x, extra_args)
        if self.capture.symbolic is None:
            raise ValueError(
                f"{type(self.model).__name__} is captured by running it (symbolic tracing "
                f"failed: {self.capture.symbolic_error}); pass an input to list its names"
                if self.capture.symbolic_error else
                f"{type(self.model).__name__} is captured by running it; pass an input"
            )
        cap = self.capture.symbolic
        return SplitCall(self.model, cap, self._interpreter(cap), (), [])

    # ------------------------------------------------------------------ execution
    def _weight_abs(self, w: torch.Tensor) -> torch.Tensor:
        cache = self._abs_cache
        if cache is None or not isinstance(w, nn.Parameter):
            return w.detach().abs()
        key = id(w)
        hit = cache.get(key)
        stamp = (w._version, w.data_ptr())
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        value = w.detach().abs()
        cache[key] = (stamp[0], stamp[1], value)
        return value

    def check_input(self, x: Inputs) -> tuple[torch.Tensor, ...]:
        """The split inputs as a tuple, after checking them (one clear error each)."""
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        if not inputs:
            raise ValueError("no input given")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the split is called inside torch.inference_mode(), where autograd (which the "
                "sensitivities and SplitLRP use) is off; call it outside inference mode"
            )
        for i, t in enumerate(inputs):
            what = "input" if len(inputs) == 1 else f"input {i}"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type == "meta":
                raise ValueError(f"{what} is a meta tensor (a shape without values); pass "
                                 "real data")
            if t.is_inference():
                raise RuntimeError(
                    f"{what} was created under torch.inference_mode() (an inference tensor, "
                    "which autograd cannot use); pass x.clone() made outside inference mode"
                )
            if not t.is_floating_point():
                raise TypeError(
                    f"{what} must be a floating point tensor, got {t.dtype}: only real-valued "
                    "inputs are split; pass integer or boolean tensors (indices, masks) after "
                    "the split inputs, as further arguments of the forward (sm(x, mask), "
                    "Captum's additional_forward_args)")
            checks.batch_size(t, what)
            checks.finite(what, t)
        return inputs

    def input_pairs(self, inputs: Sequence[torch.Tensor]) -> list[Pair]:
        """The split pairs of the inputs (``input_split``)."""
        pairs = []
        for x in inputs:
            d = x.detach()
            pairs.append(Pair(d, d.abs() if self.input_split == "relu" else torch.zeros_like(d)))
        return pairs

    def run(self, call: SplitCall, pairs: Sequence[Pair], **options: Any) -> tuple:
        """Run a prepared call on input pairs (eval semantics; see
        :meth:`core.interpreter.SplitInterpreter.run_pairs` for ``options``).

        Raises
        ------
        ValueError
            When the model's own output is not finite.
        """
        with eval_semantics(self.model, stacklevel=5, buffers=False):
            out, records = call.interpreter.run_pairs(pairs, call.extra, **options)
        if isinstance(out, torch.Tensor) and call.interpreter.frozen_operations():
            raise UnsupportedOperation(
                f"the output of {type(self.model).__name__} does not depend on its input "
                "through the split: every path to it passes an operation frozen to a constant "
                f"({'; '.join(call.interpreter.frozen_operations()[-3:])}). Split the model "
                "without its final gate (e.g. the logits before a softmax)."
            )
        if not isinstance(out, Pair):
            raise UnsupportedOperation(
                f"{type(self.model).__name__} returns {type(out).__name__}; the split needs a "
                "single output tensor. Pass output= (an index, key or callable) to "
                "core.split, or wrap the model so that it returns one tensor."
            )
        if not torch.isfinite(out.d).all():
            rows = (~torch.isfinite(out.d.reshape(out.d.shape[0], -1)).all(1)).nonzero()
            raise ValueError(
                f"the model's output is not finite for this input (rows "
                f"{rows.flatten().tolist()[:8]}): the model itself overflows; there is "
                "nothing to explain"
            )
        return out, records

    def _check_streams(self, call: SplitCall, out: Pair, dtype: torch.dtype) -> None:
        if not torch.isfinite(out.s).all():
            other = () if self.stabilizer == "scale" else ("stabilizer='scale'",)
            raise SplitOverflowError(
                f"the split stream mass overflowed {dtype} at {self._first_overflow(call)} "
                f"(stabilizer={self.stabilizer!r}). " + precision_advice(
                    dtype, *other, otherwise="Even float64 does not hold it: the weights or "
                    "the input are too large for the split; rescale the input.")
            )

    def _first_overflow(self, call: SplitCall) -> str:
        with torch.no_grad(), eval_semantics(self.model, warn=False, buffers=False):
            _, records = call.interpreter.run_pairs(self.input_pairs(call.inputs), call.extra,
                                                    record_all=True)
        for node, pair in records.items():
            if isinstance(pair, Pair) and not torch.isfinite(pair.s).all():
                return call.describe(node)
        return "the output"

    def _first_backward_overflow(self, call: SplitCall, index: torch.Tensor,
                                 factors: Shift) -> str:
        """Rerun the backward and name the node nearest the output where S is not finite."""
        first: list[fx.Node] = []
        with torch.enable_grad(), eval_semantics(self.model, warn=False, buffers=False):
            pairs = [Pair(p.d.requires_grad_(True), p.s.clone().requires_grad_(True))
                     for p in self.input_pairs(call.inputs)]
            out, records = call.interpreter.run_pairs(pairs, call.extra, factors=factors,
                                                      record_all=True)
            for node, pair in records.items():
                if isinstance(pair, Pair) and pair.s.requires_grad:
                    def hook(grad: torch.Tensor, node: fx.Node = node) -> None:
                        if not first and grad is not None and not torch.isfinite(grad).all():
                            first.append(node)
                    pair.s.register_hook(hook)
            wrt = [t for p in pairs for t in (p.d, p.s)]
            if factors.auto:  # its factors need the gradient's sizes first, at every point
                torch.autograd.grad(out.d.gather(1, index).sum(), wrt, retain_graph=True,
                                    allow_unused=True)
            seed = out.s.gather(1, index).sum() * 0.5 * factors.factor("output")
            torch.autograd.grad(seed + 0.5 * out.d.gather(1, index).sum(), wrt,
                                allow_unused=True)
        return call.describe(first[0]) if first else "the output"

    def forward_pairs(self, x: Inputs, *extra_args: Any, **kwargs: Any) -> Pair:
        """The output split pair in sum/difference form (no gradient)."""
        call = self.prepare(x, extra_args, kwargs)
        with torch.no_grad():
            out, _ = self.run(call, self.input_pairs(call.inputs))
        self._check_streams(call, out, call.inputs[0].dtype)
        return out

    def __call__(self, x: Inputs, *extra_args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of the two split streams.

        Parameters
        ----------
        x: torch.Tensor or tuple of torch.Tensor
            The model's input (a tuple: several inputs, each split).
        *extra_args, **kwargs
            Further arguments of the model's forward (passed as they are, not split).

        Returns
        -------
        tuple of torch.Tensor
            ``(g, h)`` with ``g - h == model(x)`` up to float rounding of the streams.
        """
        out = self.forward_pairs(x, *extra_args, **kwargs)
        g, h = out.pos, out.neg
        self._check_carries(g, h, out.d)
        return g, h

    def _check_carries(self, g: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
        """Warn (once per model) when ``g - h`` misses ``f`` (the ``d`` stream, the model's
        output) by more than :data:`CARRIES` of ``max |f|`` in some row."""
        if (f.dim() == 0 or f.numel() == 0 or not f.is_floating_point()
                or self.model in _IMPRECISE):
            return
        rows = f.shape[0]
        miss = (g - h - f).reshape(rows, -1).abs().amax(1)
        size = f.reshape(rows, -1).abs().amax(1)
        bad = (size > 0) & (miss > CARRIES * size)
        if not bool(bad.any()):
            return
        _IMPRECISE.add(self.model)
        worst = float((miss / size.clamp_min(torch.finfo(f.dtype).tiny))[bad].max())
        streams = float(torch.maximum(g.abs().amax(), h.abs().amax()))
        warnings.warn(SplitPrecisionWarning(
            f"g - h misses the output of {type(self.model).__name__} by up to {worst:.2g} of "
            f"its size in {f.dtype}: the streams reach {streams:.3g} against outputs of "
            f"{float(size.max()):.3g}, beyond the dtype's precision (no stabiliser, products "
            "of activations, frozen normalisations or a tiny output). g and h are right to "
            "that precision, their difference is not the output. "
            + precision_advice(f.dtype, "model(x) for the output")), stacklevel=3)

    def streams(self, x_pos: Inputs, x_neg: Inputs,
                *extra_args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The split streams on an explicit input split ``x = x_pos - x_neg`` (Theorem 1).

        Differentiable in both arguments: with ``stabilizer="none"`` and convex max pooling,
        ``g`` and ``h`` are monotone and convex functions of ``(x_pos, x_neg)``.

        Parameters
        ----------
        x_pos, x_neg: torch.Tensor or tuple of torch.Tensor
            The two input streams (any values; their difference is the model's input).

        Returns
        -------
        tuple of torch.Tensor
            ``(g, h)`` at the output.
        """
        pos = tuple(x_pos) if isinstance(x_pos, (tuple, list)) else (x_pos,)
        neg = tuple(x_neg) if isinstance(x_neg, (tuple, list)) else (x_neg,)
        call = self.prepare(tuple((p - n).detach() for p, n in zip(pos, neg, strict=True)),
                            extra_args, kwargs)
        pairs = [Pair(p - n, p + n) for p, n in zip(pos, neg, strict=True)]
        out, _ = self.run(call, pairs)
        return out.pos, out.neg

    def pairs(self, x: Inputs, layers: Sequence[str], *extra_args: Any) -> dict[str, Any]:
        """Split pairs (``.pos``, ``.neg``, ``.d``, ``.s``) at the given layers (no gradient);
        a tuple of pairs for a module with a tuple output or for several inputs."""
        call = self.prepare(x, extra_args)
        nodes = {layer: call.node_of(layer) for layer in layers}
        with torch.no_grad():
            _, records = self.run(call, self.input_pairs(call.inputs),
                                  record=_flat(nodes.values()) + list(call.elements.values()))
        call.check_values({k: v for k, v in nodes.items() if k not in ("", "input")}, records)
        return {layer: _pick(node, records) for layer, node in nodes.items()}

    # ------------------------------------------------------------------ sensitivities
    @autocast_off()  # explained in the model's dtype (the streams follow an autocast)
    def sensitivities(
        self,
        x: torch.Tensor,
        target: int | torch.Tensor,
        layers: Sequence[str] = ("input",),
        alpha: AlphaType = DEFAULT_ALPHA,
        extra_args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        who: str | None = None,
    ) -> dict[str, Any]:
        """Split activations and shifted local sensitivities at the given layers.

        Parameters
        ----------
        x: torch.Tensor or tuple of torch.Tensor
            The input batch (a tuple: several inputs, each split).
        target: int or torch.Tensor
            The class index, or a 1-D tensor with one index per row.
        layers: sequence of str
            Names from ``model.named_modules()`` (the module's output; containers allowed),
            ``"input"`` (or ``""``; ``"input:1"``... for further inputs), ``"NAME:input"`` for
            a module's input (refused with :class:`core.SeveralInputsError`, a
            ``ValueError``, for a module called with several tensors that depend on the
            input: probe where they are computed), ``"NAME:0"``... for the elements of a
            tuple output.
        alpha: float, "auto" or mapping
            Default ``"auto"`` (:data:`core.shift.DEFAULT_ALPHA`). The backward shift
            ``S <- (1 - 2 alpha) S`` at the input, after every ReLU-type unit and at the
            output; a mapping from shift-point names (see :meth:`shift_points`, plus
            ``"default"``) overrides it per point; ``"auto"`` chooses it per point and row
            (:mod:`core.shift`; the chosen alphas are in each probe's ``alphas``). A fixed
            alpha whose map is dominated by the shift part warns once per model and layer
            (:class:`core.SplitClassBlindWarning`).
        extra_args, kwargs:
            Further positional and keyword arguments of the model's forward.
        who: str, optional
            The caller (an adapter, ``"SplitCAM"``): the checks of the layer names, the
            target and the output name it first and ask for a ``layer`` to pass where they
            would ask for a name to probe; it wraps the call in :func:`core.errors.caller`
            for every other error.

        Returns
        -------
        dict of str to Probe
            One :class:`core.Probe` per requested layer (a tuple of probes for a layer with a
            tuple output, and for ``"input"`` with several inputs).

        Raises
        ------
        ValueError
            Before the backward passes, for an output that is not ``(batch, classes)`` logits
            with one row per input row (:func:`core.checks.logits`; a forward that mixes
            the batch, ``x.view(1, -1)`` or ``out.mean(0)``, is refused) or a target out of
            range.
        UnsupportedOperation
            For a layer that reaches the output only through operations frozen to constants
            (``nonlinear="freeze"``: a squeeze-excitation gate's ``fc``), whose sensitivities
            in the frozen model are zero.
        """
        check_alpha(alpha)  # before the capture, which a first call of a model runs
        call = self.prepare(x, extra_args, kwargs, backward=True)
        if isinstance(layers, str):
            layers = [layers]
        nodes = {layer: call.node_of(layer, who) for layer in layers}
        factors = Shift(call.interpreter.shift_points(), alpha)
        first = call.inputs[0]
        index = checks.targets(target, first.shape[0], who).to(first.device)
        unique = list(dict.fromkeys(_flat(nodes.values())))
        with torch.enable_grad():
            pairs = [Pair(p.d.requires_grad_(True), p.s.clone().requires_grad_(True))
                     for p in self.input_pairs(call.inputs)]
            # above the deepest probe only the backward of the s stream is needed, not its
            # values (mass-linear rules): the |W| products there are not computed
            free = call.interpreter.mass_free(unique)
            # below the probes nothing needs a backward graph: the probes become its leaves
            out, records = self.run(call, pairs, factors=factors,
                                    record=unique + list(call.elements.values()),
                                    mass_free=free, leaves=unique)
            call.check_values(nodes, records, who)
            checks.logits(out.d, who, batch=first.shape[0])
            for mass in [out.s] if not free else [records[n].s for n in unique]:
                self._check_streams(call, Pair(out.d, mass), out.d.dtype)
            checks.target_range(index, out.d.shape[1], who)
            index = index.view(-1, 1)
            sel_d = out.d.gather(1, index).sum()
            sel_s = out.s.gather(1, index).sum()
            ds = [records[n].d for n in unique]
            ss = [records[n].s for n in unique]
            if not sel_d.requires_grad:  # no probe reaches the output: all are refused below
                grads = both = (None,) * (2 * len(unique))
            else:
                grads = torch.autograd.grad(sel_d, ds, retain_graph=True, allow_unused=True)
                half = torch.tensor(0.5, dtype=out.d.dtype, device=out.d.device)
                both = torch.autograd.grad(
                    [sel_d, sel_s], ds + ss,
                    grad_outputs=[half, half * factors.factor("output")], allow_unused=True,
                )
        self._refuse_unreached(call, unique, grads, both)
        probes: dict[fx.Node, Probe] = {}
        after = call.interpreter.frozen_after()
        for i, node in enumerate(unique):
            d, s = records[node].d.detach(), records[node].s.detach()
            probe = Probe(
                activation=d, mass=s,
                S=_or_zero(both[len(unique) + i], s) * 2,
                Dg=_or_zero(both[i], d) * 2,
                grad=_or_zero(grads[i], d), alphas=factors.alphas,
                frozen=after.get(node, ()),
            )
            if not (torch.isfinite(probe.S).all() and torch.isfinite(probe.Dg).all()):
                where = self._first_backward_overflow(call, index, factors)
                why = ("the S stream grows like the product of |W| over the layers above. "
                       if not torch.isfinite(probe.S).all() else "")
                # alpha='auto' keeps S at a tenth of the gradient: a smaller shift is no remedy
                remedies = () if factors.auto else ("a larger alpha (closer to 0.5)",
                                                    "alpha='auto'")
                raise SplitOverflowError(
                    f"the sensitivities at {call.describe(node)} overflowed {d.dtype} at "
                    f"alpha={alpha_label(alpha)} (first at {where}, counting from the output): "
                    + why + precision_advice(
                        d.dtype, *remedies, otherwise="Even float64 does not hold it: the "
                        "weights or the input are too large; rescale the input.")
                )
            probes[node] = probe
        result = {layer: _pick(node, probes) for layer, node in nodes.items()}
        for layer, picked in result.items():
            for probe in picked if isinstance(picked, tuple) else (picked,):
                warn_if_class_blind(self, layer, probe, factors)
        return result

    @staticmethod
    def _refuse_unreached(call: SplitCall, unique: list[fx.Node], grads: Sequence[Any],
                          both: Sequence[Any]) -> None:
        """Refuse a probe from which no split operation leads to the output (its only paths
        pass operations frozen to constants, such as a squeeze-excitation gate's ``fc``):
        the frozen model's sensitivities there are zero by construction, not a map."""
        n = len(unique)
        for i, node in enumerate(unique):
            if grads[i] is None and both[i] is None and both[n + i] is None:
                frozen = call.interpreter.frozen_after().get(node, ())
                via = f" ({'; '.join(frozen[:3])})" if frozen else ""
                raise UnsupportedOperation(
                    f"{call.describe(node)} reaches the model's output only through "
                    f"operations frozen to constants at the input{via}, so its sensitivities "
                    "in the frozen model are zero, not an explanation; explain a layer on a "
                    "path that is split (the block's output, or the activation the gate "
                    "scales)."
                )

    @autocast_off()  # explained in the model's dtype (the streams follow an autocast)
    def relevance(
        self,
        x: Inputs,
        seed: torch.Tensor,
        layers: Sequence[str] = (),
        epsilon: float = 1e-6,
        activation_rule: str = "pass",
        residual: str = "even",
        extra_args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """SplitLRP relevance (epsilon-LRP on the split pair); see :func:`core.lrp.relevance`.

        Parameters
        ----------
        x: torch.Tensor or tuple of torch.Tensor
            The input batch (a tuple: several inputs, each split, as for :meth:`__call__`).
        seed: torch.Tensor
            Relevance at the positive stream's output, shaped like the model's output.
        layers, epsilon, activation_rule, residual, extra_args, kwargs:
            As for :func:`core.lrp.relevance`.

        Returns
        -------
        dict of str to core.lrp.Relevance
            ``"input"`` and each requested layer, with ``.pos``, ``.neg`` and ``.comb``;
            with several inputs ``"input"`` is a tuple of one relevance per input (as the
            sensitivities' probes), ``"input:1"`` the second input's.
        """
        from core.lrp import relevance

        return relevance(self, x, seed, layers=layers, epsilon=epsilon,
                         activation_rule=activation_rule, residual=residual,
                         extra_args=extra_args, kwargs=kwargs)


def _ask(who: str | None, what: str, adapter: str | None = None) -> str:
    """What to do instead, in :mod:`core`'s words (``"probe WHAT"``) or, for an adapter
    ``who``, in its own (``"pass layer WHAT"``, or ``"pass ADAPTER"`` where given)."""
    if who is None:
        return f"probe {what}"
    return f"pass {adapter}" if adapter is not None else f"pass layer {what}"


def _activations(layer: str, values: Sequence[Any]) -> list[str]:
    """The names ``"LAYER:i"`` of the elements of a tuple output that are split pairs."""
    return [f"{layer}:{i}" for i, v in enumerate(values) if isinstance(v, Pair)]


def _flat(nodes: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    for n in nodes:
        out.extend(n if isinstance(n, tuple) else (n,))
    return out


def _pick(node: Any, values: Mapping[fx.Node, Any]) -> Any:
    if isinstance(node, tuple):
        return tuple(values[n] for n in node)
    return values[node]


def _or_zero(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t.detach()


def split(
    model: nn.Module,
    maxpool: str = "convex",
    stabilizer: str = "scale",
    input_split: str = "relu",
    merge_batchnorm: bool = False,
    theta: float = 0.1,
    threshold: float = 10.0,
    cache_abs_weights: bool = False,
    output: Any = None,
    nonlinear: str = "error",
    reuse_capture: bool = True,
) -> SplitModel:
    """Split a trained piecewise-linear model into its split pair ``(g, h)``.

    See :class:`SplitModel` for the parameters. Splitting the same, unchanged model object
    again reuses its capture (``reuse_capture``, :mod:`core.reuse`).

    Returns
    -------
    SplitModel
        A view of ``model``; ``g, h = split(model)(x)`` gives ``g - h == model(x)``.

    Raises
    ------
    UnsupportedOperation
        When the model contains an operation without any split rule, or one that is not
        piecewise linear with ``nonlinear="error"`` (the message names the option).
    """
    return SplitModel(model, maxpool=maxpool, stabilizer=stabilizer, input_split=input_split,
                      merge_batchnorm=merge_batchnorm, theta=theta, threshold=threshold,
                      cache_abs_weights=cache_abs_weights, output=output,
                      nonlinear=nonlinear, reuse_capture=reuse_capture)
