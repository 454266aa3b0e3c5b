"""Capture: from a user's model and call to the graph that the split evaluates.

Two mechanisms produce the same kind of ``torch.fx`` graph (``call_module`` for ``torch.nn``
leaf modules, ``call_function``, ``call_method``, ``get_attr``):

* **symbolic** (:func:`core.graph.trace`): ``torch.fx`` tracing, once per model, with the
  forward's optional arguments fixed to their defaults. Used for a call with one tensor
  input and nothing else (the common ``model(x)``) when no module has forward hooks and no
  ``output=`` selector is given.
* **eager** (:func:`core.record.record`): the model runs once on the real input and every
  operation is recorded; the graph is specialised on the input's signature (shapes, dtypes,
  device, non-tensor arguments) and cached per signature. Everything else uses it, and so
  does every model that symbolic tracing cannot follow. A forward whose control flow reads
  tensor values is recorded again at every call.

Wrapped models (``torch.compile``'s ``OptimizedModule``, ``DataParallel``,
``DistributedDataParallel``) are split through the module they wrap, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from core.errors import UnsupportedOperation
from core.graph import (
    Submodules,
    TraceFailure,
    fold_stacked_sums,
    resolve_inplace,
    trace,
    written_in_place,
)
from core.record import (
    MODULE_HOOK_DICTS,
    RANDOM,
    AutocastWatch,
    InputDependent,
    argument_tensors,
    global_hooks,
    record,
    stop_gradient,
)
from core.registry import TABLE, FunctionName
from core.twin import module_twin


@dataclass
class Captured:
    """One captured graph of the model.

    Attributes
    ----------
    graph: torch.fx.Graph
    inputs: int
        The number of split inputs (the graph's first placeholders).
    mechanism: str
        ``"symbolic"`` or ``"eager"``.
    module_outputs, module_inputs: dict
        The node (or tuple of nodes) of each module's output and the node of its input, by
        module name; a tuple of nodes where the module is called with several tensors that
        depend on the model's input (it has no single input to probe).
    reusable: bool
        False when the forward's control flow read tensor values (valid for one call).
    plans: dict
        The interpreter's plans of this graph without their modules, by option
        (:class:`core.interpreter.SplitInterpreter`'s ``plans``).
    stop_gradient: str or None
        What the forward computes from the input with gradients off (a ``torch.no_grad()``
        block, a custom ``autograd.Function``) on a path to the output, if anything: the
        backward passes refuse it (:func:`core.record.grad_off`); the streams do not.
    """

    graph: fx.Graph
    inputs: int
    mechanism: str
    module_outputs: dict[str, Any] = field(default_factory=dict)
    module_inputs: dict[str, fx.Node | tuple[fx.Node, ...]] = field(default_factory=dict)
    reusable: bool = True
    value_dependent: list[str] = field(default_factory=list)
    plans: dict[Hashable, Any] = field(default_factory=dict)
    stop_gradient: str | None = None

    def input_nodes(self) -> list[fx.Node]:
        """The placeholders of the split inputs."""
        return [n for n in self.graph.nodes if n.op == "placeholder"][: self.inputs]

    def layer_names(self) -> list[str]:
        """Names that the split's probes accept."""
        names = ["input"] + [f"input:{i}" for i in range(1, self.inputs)]
        names += [n for n in self.module_outputs if n]
        return names + [f"{n}:input" for n, v in self.module_inputs.items()
                        if n and not isinstance(v, tuple)]


#: What to do with a ``torch.export`` program (:func:`exported`).
EXPORT_FIX = ("Pass the original nn.Module (the model given to torch.export.export) to "
              "core.split instead.")


def exported(model: Any) -> str | None:
    """Why ``model`` is a ``torch.export`` artefact that the split cannot read, or None.

    An ``ExportedProgram``, its ``.module()`` or ``torch.export.unflatten``'s module (and any
    ``fx.GraphModule`` of ATen operators, ``aten.linear.default``...) is a graph of ATen
    operators after decomposition and functionalisation, not the Python operations and
    modules whose split-pair rules the split has.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return "is a torch.export ExportedProgram, not an nn.Module"
    if not isinstance(model, nn.Module):
        return None
    if any(c.__module__.startswith("torch.export") for c in type(model).__mro__):
        return ("is the module of a torch.export program (ExportedProgram.module() or "
                "torch.export.unflatten), a graph of ATen operators that the split has no "
                "rules for")
    if isinstance(model, fx.GraphModule):
        aten = [n.target for n in model.graph.nodes
                if isinstance(n.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)]
        if aten:
            return (f"is an fx.GraphModule of ATen operators ({aten[0]}: torch.export, make_fx "
                    "or AOT autograd), which the split has no rules for")
    return None


def _wrapped(model: nn.Module) -> tuple[nn.Module, str, str] | None:
    """``(inner module, its attribute name, how to say it)`` of a ``torch.compile`` /
    ``DataParallel`` / DDP wrapper; None for any other module."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        return model._orig_mod, "_orig_mod", "torch.compile's OptimizedModule: its _orig_mod"
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module, "module", f"{type(model).__name__}: its .module"
    return None


def wrapped_module(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside any ``torch.compile`` / ``DataParallel`` / DDP wrappers of ``model``
    and its name in ``model.named_modules()`` (``"_orig_mod"``, ``"module"``,
    ``"_orig_mod.module"``...; ``""`` and ``model`` itself when it is not wrapped).

    Unlike :func:`unwrap`, no warning and no check: for naming layers of a wrapped model.
    """
    prefix: list[str] = []
    while (step := _wrapped(model)) is not None:
        model = step[0]
        prefix.append(step[1])
    return model, ".".join(prefix)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` / ``DataParallel`` / DDP wrapper holds (with a warning);
    a clear error for TorchScript, ``torch.export`` (:func:`exported`), meta-device and not
    yet initialised (lazy) models."""
    why = exported(model)
    if why is not None:
        raise UnsupportedOperation(f"the model ({type(model).__name__}) {why}. {EXPORT_FIX}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedOperation(
            f"{type(model).__name__} is a TorchScript module: its forward is compiled "
            "TorchScript, not Python operations that the split can capture. Split the "
            "original nn.Module (before torch.jit.script / torch.jit.trace)."
        )
    while (step := _wrapped(model)) is not None:
        inner, attribute, how = step
        hooks = [k.strip("_") for k in MODULE_HOOK_DICTS
                 if any(not getattr(getattr(h, "__self__", None), "split_own", False)
                        for h in (getattr(model, k, None) or {}).values())]
        if hooks:  # they run around the wrapper, which the split goes past
            raise UnsupportedOperation(
                f"the {type(model).__name__} wrapper has {' and '.join(hooks)}: the split "
                f"takes the wrapped module (.{attribute}), so they would be left out. Register "
                f"them on model.{attribute} instead, or split model.{attribute} (without them)."
            )
        warnings.warn(f"the model is wrapped by {how} is split (on the input's device)",
                      stacklevel=4)
        model = inner
    if _has_unmaterialised(model):
        named = (*model.named_parameters(), *model.named_buffers())
        lazy = [n for n, t in named if is_lazy(t)]
        if lazy:
            raise ValueError(
                f"the model's tensors {lazy[:3]} are not initialised yet (lazy modules such as "
                "nn.LazyLinear get their shapes at the first forward); run the model once on an "
                "input (model(x)) before splitting it"
            )
        meta = [n for n, t in named if t.is_meta]
        raise ValueError(
            f"the model's tensors {meta[:3]} are on the meta device (shapes without values); "
            "materialise the model first (model.to_empty(device=...) and load its weights)"
        )
    return model


def _has_unmaterialised(model: nn.Module) -> bool:
    """Whether a parameter or buffer of the model is on the meta device or not initialised
    (a lazy module before its first forward) -- a walk over each module's own tensors
    (``recurse=False``) and children: ``model.modules()`` builds every module's name."""
    stack, seen = [model], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.is_meta or is_lazy(t):
                return True
        stack.extend(m.children())
    return False



def _has_hooks(model: nn.Module) -> bool:
    """Forward hooks on a module or global ones (which eager recording refuses by name):
    symbolic tracing bypasses them."""
    return bool(global_hooks()) or any(m._forward_hooks or m._forward_pre_hooks
                                       for m in model.modules())


def _signature(model: nn.Module) -> tuple[int, dict[str, Any]] | None:
    """The number of required positional parameters of the forward and the defaults of the
    others (None for ``*args``/``**kwargs`` or keyword-only parameters without defaults)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    required, defaults = 0, {}
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
        if p.default is inspect.Parameter.empty:
            if defaults or p.kind == inspect.Parameter.KEYWORD_ONLY:
                return None
            required += 1
        else:
            defaults[p.name] = p.default
    return required, defaults


def selector(output: Any) -> Callable[[Any], Any] | None:
    """``output=`` as a function of the model's output: an index, a key or a callable."""
    if output is None or callable(output):
        return output
    if isinstance(output, (int, str)):
        def pick(value: Any) -> Any:
            kind = type(value).__name__
            if isinstance(value, dict):
                if output in value:
                    return value[output]
                raise KeyError(f"output={output!r}: the model's output ({kind}) has no such "
                               f"key; its keys: {list(value)}")
            if isinstance(value, (tuple, list)):
                fields = getattr(value, "_fields", ())  # a namedtuple's
                if isinstance(output, str) and output in fields:
                    return getattr(value, output)
                if isinstance(output, int) and -len(value) <= output < len(value):
                    return value[output]
                if isinstance(output, int):
                    raise IndexError(f"output={output!r}: the model's output is a {kind} of "
                                     f"{len(value)} elements")
                raise TypeError(f"output={output!r} cannot select from {kind}: use an index"
                                + (f" or one of its fields {list(fields)}" if fields else ""))
            if isinstance(output, str) and hasattr(value, output):
                return getattr(value, output)
            raise TypeError(f"output={output!r} cannot select from {kind}")

        return pick
    raise TypeError(f"output must be an int index, a str key/attribute or a callable, got "
                    f"{type(output).__name__}")


_IMMUTABLE = (type, types.FunctionType, types.BuiltinFunctionType, torch.dtype, torch.layout,
              torch.memory_format, torch.device)


def _key(value: Any) -> Hashable | None:
    """The cache key of one argument of the forward; None for an object that is compared by
    identity only (a config object, a numpy array, a module): its contents may change in
    place between calls, so a graph recorded for it is not kept."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.device.index)
    try:
        hash(value)
    except TypeError:
        return None
    if type(value).__hash__ is object.__hash__ and not isinstance(value, _IMMUTABLE):
        return None
    return (type(value), value)


@dataclass
class Found:
    """What capturing a model found, free of references to the model (so that
    :mod:`core.reuse` can keep it between splits).

    Attributes
    ----------
    symbolic: Captured or None
        The traced graph (None when tracing failed or does not apply).
    symbolic_error: Exception or None
        Why tracing failed (without its traceback).
    positional: int
        The number of required positional parameters of the forward.
    eager: dict
        The eager graphs by input signature.
    """

    symbolic: Captured | None = None
    symbolic_error: Exception | None = None
    positional: int = 0
    eager: dict[Hashable, Captured] = field(default_factory=dict)
    checked: bool = False  # the traced graph was checked against the forward (agrees_eagerly)


def _refuse_stale_weights(model: nn.Module) -> None:
    """Refuse the deprecated ``torch.nn.utils.weight_norm`` / ``spectral_norm`` and
    ``torch.nn.utils.prune``: their forward pre-hook recomputes ``weight`` as a plain
    attribute of the module at each forward; the split reads the module's attribute, which
    is that of its last forward (stale after loading weights or an optimizer step, or before
    any forward)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                raise UnsupportedOperation(
                    f"module {name or type(model).__name__!r} is pruned by "
                    "torch.nn.utils.prune, whose forward pre-hook recomputes "
                    f"{hook._tensor_name!r} ({hook._tensor_name}_orig * mask) as a plain "
                    "attribute at each forward; the split would read the value of the "
                    "module's last forward. Make the pruning permanent with "
                    f"torch.nn.utils.prune.remove(module, {hook._tensor_name!r}) (on a copy "
                    "of the model) before splitting it."
                )
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                raise UnsupportedOperation(
                    f"module {name or type(model).__name__!r} uses the deprecated "
                    f"torch.nn.utils.{kind}, whose forward pre-hook recomputes "
                    f"{hook.name!r} as a plain attribute at each forward; the split would "
                    "read the value of the module's last forward. Use "
                    f"torch.nn.utils.parametrizations.{kind} (split exactly), or "
                    f"torch.nn.utils.remove_{kind} on a copy of the model."
                )


def find(model: nn.Module) -> Found:
    """Trace the model symbolically where that applies (see the module docstring)."""
    _refuse_stale_weights(model)
    signature = _signature(model)
    found = Found(positional=signature[0] if signature else 0)
    if "forward" in vars(model):  # torch.fx traces type(model).forward
        found.symbolic_error = TraceFailure(
            f"{type(model).__name__}'s forward is replaced on the instance, which torch.fx "
            "does not follow")
    elif signature and signature[0] and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in signature[1].values()
    ):
        try:
            traced = trace(model, concrete_args=signature[1])
        except TraceFailure as err:
            # the message only: the traceback's frames would keep the model alive
            found.symbolic_error = TraceFailure(*err.args)
        else:
            out = next(n for n in reversed(traced.graph.nodes) if n.op == "output").args[0]
            refuse_random(model, [name for name in map(_name, traced.graph.nodes)
                                  if name in RANDOM])
            reads = next((n for n in traced.graph.nodes if n.op == "call_method"
                          and n.target in _READS_VALUE), None)
            kept = _kept_call(traced.graph)
            if reads is not None:  # a number of each call: recorded per call (core.record)
                found.symbolic_error = TraceFailure(
                    f"the forward reads a tensor value as a number ({reads.target}())")
            elif kept is not None:  # its operations are recorded one by one
                found.symbolic_error = TraceFailure(
                    f"torch.fx keeps {FunctionName.of(kept)} as one call (torch.fx.wrap), "
                    "which no split-pair rule knows")
            elif isinstance(out, fx.Node) and not isinstance(out.target, type):
                found.symbolic = Captured(traced.graph, 1, "symbolic", traced.module_outputs,
                                          traced.module_inputs)
    return found


_READS_VALUE = frozenset({"item", "tolist"})


def _kept_call(graph: fx.Graph) -> Any:
    """The first Python function outside torch that tracing kept as one call
    (``torch.fx.wrap``, as torchvision does for ``shifted_window_attention``), that has no
    rule and that is applied to values depending on the input (None if there is none): eager
    recording sees the operations inside it. (A call on parameters and constants only is
    evaluated as it is, as torchvision's ``_get_relative_position_bias``.)"""
    kept = [n for n in graph.nodes if n.op == "call_function"
            and type(n.target) is types.FunctionType and TABLE.function(n.target) is None
            and not FunctionName.of(n.target).startswith("torch.")]
    if not kept:
        return None
    dependent = InputDependent(graph, 1)
    return next((n.target for n in kept if n in dependent), None)


def _name(node: fx.Node) -> str:
    """The name of a call's target (a method's name, a function's ``__name__``)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def refuse_random(model: nn.Module, names: list[str]) -> None:
    """Refuse a forward that draws random numbers: ``g - h`` would be the output of one draw
    and ``model(x)`` of another."""
    if names:
        raise UnsupportedOperation(
            f"{type(model).__name__}'s forward draws random numbers ({', '.join(names[:3])}) "
            "with eval semantics, so its output changes from call to call and no split can "
            "equal it. Make the forward deterministic in eval mode (draw only under "
            "`if self.training:`, or pass training=self.training to functional dropout)."
        )


class Capture:
    """The captured graphs of one model (see the module docstring).

    Parameters
    ----------
    model: torch.nn.Module
        The model (already unwrapped).
    output: int, str or callable, optional
        Selects the tensor to split from a structured output.
    found: Found, optional
        What an earlier capture of the unchanged model found (:mod:`core.reuse`); without
        it the model is traced here.
    shared: callable, optional
        With ``found``: whether the model still has the fingerprint under which ``found`` is
        kept, so that a new eager graph may go into it (else this capture continues on a
        private copy).
    """

    def __init__(self, model: nn.Module, output: Any = None, found: Found | None = None,
                 shared: Callable[[], bool] | None = None) -> None:
        self.model = model
        self.output = selector(output)
        self.found = find(model) if found is None else found
        self._shared = shared

    @property
    def symbolic(self) -> Captured | None:
        """The traced graph (None when the model is captured eagerly only)."""
        return self.found.symbolic

    @property
    def symbolic_error(self) -> Exception | None:
        """Why symbolic tracing failed, if it did."""
        return self.found.symbolic_error

    @property
    def cached(self) -> int:
        """How many eager graphs are cached (one per input signature)."""
        return len(self.found.eager)

    def shareable(self) -> bool:
        """Whether what this capture finds from now on may go into the shared state: the
        model still has the fingerprint under which it is kept. Once it has not, the
        capture continues on a private copy."""
        if self._shared is None:
            return True
        if self._shared():
            return True
        self.found = dataclasses.replace(self.found, eager=dict(self.found.eager))
        self._shared = None
        return False

    def usable_symbolic(self, inputs: int, extra: tuple, kwargs: dict) -> bool:
        """Whether the symbolic graph serves this call."""
        return (self.symbolic is not None and self.output is None and not kwargs
                and inputs == 1 and not extra and self.found.positional == 1
                and not _has_hooks(self.model))

    def get(self, inputs: tuple[torch.Tensor, ...], extra: tuple = (),
            kwargs: dict | None = None) -> Captured:
        """The graph for a call (symbolic, cached eager or freshly recorded)."""
        kwargs = kwargs or {}
        if self.usable_symbolic(len(inputs), extra, kwargs):
            if not self.found.checked:
                agrees = agrees_eagerly(self.model, self.symbolic.graph, inputs[0])
                self.found.checked = agrees is not None
                if agrees is False:
                    self.found.symbolic_error = TraceFailure(
                        "the traced graph computes another output than the forward (Python "
                        "that tracing cannot follow: isinstance(x, torch.Tensor), type(x), "
                        "torch.is_tensor(x) of a traced value)")
                    self.found.symbolic = None
            if self.symbolic is not None:
                return self.symbolic
        leaves, spec = pytree.tree_flatten((extra, kwargs))
        ids = [id(t) for t in (*inputs, *argument_tensors(extra, kwargs))]
        key = (len(inputs), tuple(_key(t) for t in inputs), tuple(_key(v) for v in leaves),
               str(spec), tuple(map(ids.index, ids)))  # which argument is an input
        kept = None not in key[2]  # no argument compared by identity only (_key)
        hit = self.found.eager.get(key) if kept else None
        if hit is not None:
            return hit
        rec = record(self.model, inputs, extra, kwargs, self.output)
        refuse_random(self.model, rec.random)
        if not isinstance(rec.output, fx.Node):
            raise UnsupportedOperation(
                f"{type(self.model).__name__} returns {type(rec.output).__name__}; the split "
                "needs a single output tensor that depends on the input. Pass output= (an "
                "index, a key or a callable that picks the logits), e.g. "
                "core.split(model, output=0)."
            )
        _eliminate_dead_code(rec.graph)
        resolve_inplace(rec.graph, Submodules(self.model))
        fold_stacked_sums(rec.graph)
        captured = Captured(rec.graph, len(inputs), "eager", rec.module_outputs,
                            rec.module_inputs, not rec.value_dependent, rec.value_dependent,
                            stop_gradient=stop_gradient(rec.graph, rec.grad_off))
        captured.reusable = captured.reusable and kept
        if captured.reusable:
            self.shareable()
            self.found.eager[key] = captured
        return captured


def agrees_eagerly(model: nn.Module, graph: fx.Graph, x: torch.Tensor) -> bool | None:
    """Whether the traced graph gives the forward's output on ``x`` (checked once per model,
    at its first call). A traced value is an ``fx.Proxy``, so Python that tests types
    (``isinstance(y, torch.Tensor)``, ``type(y) is torch.Tensor``, ``torch.is_tensor``,
    ``isinstance(y.shape, torch.Size)``) takes another branch while tracing than in the
    eager forward, and the graph would be split silently. Both run on eval-mode twins
    (:func:`core.twin.module_twin`); parameters that the graph writes into are copies.
    None (undecided) when the forward itself raises on ``x``."""
    writes = any(n.op == "get_attr" and written_in_place(n) for n in graph.nodes)
    params: dict[int, nn.Parameter] = {}
    outs = []
    for run in ("forward", "graph"):
        twin = module_twin(model, training=False)
        if writes:  # the twins share the user's parameters
            with torch.no_grad():
                for m in twin.modules():
                    for k, v in list(m.named_parameters(recurse=False, remove_duplicate=False)):
                        if id(v) not in params:
                            params[id(v)] = nn.Parameter(v.detach().clone(), v.requires_grad)
                        setattr(m, k, params[id(v)])
        x = x.detach().clone()  # a forward may write into its input
        try:  # gradients on, as the capture runs the forward
            with torch.enable_grad(), AutocastWatch() as watch:
                out = twin(x) if run == "forward" else fx.Interpreter(twin, graph=graph).run(x)
        except Exception:  # undecided on an input the forward refuses; the split says why
            return None if run == "forward" else False
        if watch.seen:  # tracing left torch.autocast out: recorded (and refused) eagerly
            return False
        outs.append(out.detach() if isinstance(out, torch.Tensor) else out)
        del out  # its autograd graph goes before the next run
    want, got = outs
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
            and want.shape == got.shape):
        return False
    finite = torch.isfinite(want) & torch.isfinite(got)
    if not finite.any():
        return True  # a non-finite output is refused later, with its own message
    scale = max(float(want[finite].abs().max()), torch.finfo(want.dtype).tiny)
    return float((want[finite] - got[finite]).abs().max()) <= 1e-4 * scale


def _eliminate_dead_code(graph: fx.Graph) -> None:
    """Drop nodes whose values are never used (e.g. comparisons read by Python control flow
    only); in-place writes are kept."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                          "")
        if node.op != "get_attr" and name.endswith("_") and not name.endswith("__"):
            continue
        graph.erase_node(node)
