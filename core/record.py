"""Eager capture: record a model's forward on a real input as a torch.fx graph.

Used where symbolic tracing (:func:`core.graph.trace`) cannot follow the forward: Python
control flow on shapes or values, optional arguments, keyword arguments, several tensor
inputs, structured outputs, module hooks. The model runs once, eagerly, under a
``torch.overrides.TorchFunctionMode`` (every torch function and tensor method on a tensor
that depends on an input or on the model's parameters and buffers becomes a ``call_function``
or ``call_method`` node) while ``nn.Module.__call__`` is intercepted (a leaf module --
``torch.nn``'s own, as in torch.fx -- becomes one ``call_module`` node; nothing inside it is
recorded; its own forward hooks run and are recorded). Parameters and buffers become
``get_attr`` nodes (read live at every run); every other value -- shapes, Python numbers,
tensors created from constants -- is specialised into the graph. The graph is therefore
valid for inputs with the same signature (shapes, dtypes, device, non-tensor arguments);
:class:`core.capture.Capture` caches it per signature.

Item assignment (``x[i] = v``) is recorded as an out-of-place :func:`assign`; a view of
``x`` (or the tensor ``x`` views) taken before the assignment and used after it is refused
when it covers an element that the assignment wrote.

Value-dependent control flow (``bool``, ``item``, ``tolist`` ... on a tensor that depends on
the input) is detected: such a graph is valid for the recorded input only and is recorded
again for every call.

Tensors among the further arguments (a mask, indices, a second tensor that is not split)
are placeholders after the split inputs (``argument_0``, ...; :func:`argument_tensors` lists
them in order), read at every run: they are never baked into the graph as constants.

The recording never changes the model: it runs on an eval-mode twin of the module tree
(:func:`core.twin.module_twin`: shared parameters, copies of the buffers and tensor
attributes, own module objects), so a forward that updates a buffer (a call counter, an EMA)
or writes an attribute (``self.last = x``) writes the copy. A forward that reaches the
user's modules themselves (``model.forward = lambda x: type(model).forward(model, x)``, a
closure over the model) has their calls redirected to the twins; what such a closure writes
directly on the user's model is beyond the copy's reach.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from core.errors import UnsupportedOperation
from core.twin import module_twin

_DUNDERS = {
    "__getitem__": operator.getitem, "__neg__": operator.neg, "__iadd__": operator.iadd,
    "__isub__": operator.isub, "__imul__": operator.imul, "__itruediv__": operator.itruediv,
    "__matmul__": operator.matmul,
}
# non-tensor results that depend on shapes/metadata only (specialised by the signature)
_QUERIES = {"size", "dim", "numel", "nelement", "ndimension", "type", "get_device",
            "is_contiguous", "element_size", "stride", "shape", "dtype", "device", "ndim",
            "is_cuda", "requires_grad", "layout", "__len__", "is_floating_point",
            "is_complex", "data_ptr", "storage_offset", "is_leaf", "grad_fn", "names",
            "__format__", "__repr__", "__hash__", "__reduce_ex__", "dim_order", "is_nested"}
_STATE = threading.local()
# tensor methods that register hooks on the gradient
_GRADIENT_HOOKS = frozenset({"register_hook", "register_post_accumulate_grad_hook"})
RANDOM = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "normal", "normal_", "poisson", "multinomial", "uniform_",
    "exponential_", "random_", "geometric_", "cauchy_", "log_normal_", "native_dropout",
})
"""Names of torch functions and tensor methods that draw random numbers."""


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors among the leaves of nested tuples, lists and dicts."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())


def _has_tensor(out: Any) -> bool:
    """Whether a result is a tensor or a tuple or list holding one."""
    return isinstance(out, torch.Tensor) or (
        isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in out))


def module_input(arguments: list[Any], dependent: Any) -> Any:
    """The input of a module call, from the graph values of its tensor arguments in order.

    The one argument among them that depends on the model's input (a mask or a parameter
    passed along is not the module's input); a tuple of them where several do (the module
    has no single input: a probe of it is refused); the first argument where none does;
    None without arguments. ``dependent`` tells whether an argument depends on the input
    (``in``).
    """
    unique = list(dict.fromkeys(arguments))
    if len(unique) < 2:  # the one argument (whether it depends on the input or not)
        return unique[0] if unique else None
    on_input = [a for a in unique if a in dependent]
    if len(on_input) > 1:
        return tuple(on_input)
    return on_input[0] if on_input else unique[0]


class InputDependent:
    """The nodes of ``graph`` computed from its first ``inputs`` placeholders (the split
    inputs; further placeholders are arguments that are not split), as a set that is
    computed at its first use (``node in dependent``): a pass over the graph that most
    captures never need."""

    def __init__(self, graph: fx.Graph, inputs: int) -> None:
        self.graph, self.inputs = graph, inputs
        self._nodes: set[fx.Node] | None = None

    def __contains__(self, node: object) -> bool:
        if self._nodes is None:
            seeds = [n for n in self.graph.nodes if n.op == "placeholder"][: self.inputs]
            self._nodes = dependent = set(seeds)
            for n in self.graph.nodes:
                if any(a in dependent for a in n.all_input_nodes):
                    dependent.add(n)
        return node in self._nodes


def leaves(value: Any, kind: type) -> list[Any]:
    """The leaves of type ``kind`` (tensors, fx proxies) among nested tuples, lists and
    dicts, in argument order."""
    if isinstance(value, kind):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in leaves(v, kind)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaves(v, kind)]
    return []


def argument_tensors(extra: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The tensors among the further arguments of a call, in the order of their
    placeholders (pytree order of ``(extra, kwargs)``)."""
    leaves = torch.utils._pytree.tree_leaves((tuple(extra), dict(kwargs or {})))
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def assign(target: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``target[index] = value`` without writing into ``target``: a copy with the values
    assigned (how a recording represents item assignment)."""
    out = target.clone()
    out[index] = value
    return out


def _basic_index(index: Any) -> bool:
    """Whether ``x[index]`` is a view of ``x`` (integers, slices, None, Ellipsis)."""
    items = index if type(index) is tuple else (index,)
    return all(i is None or i is Ellipsis or type(i) in (int, slice) for i in items)


# torch.nn modules that are compositions of other torch.nn modules (attention, Linear,
# LayerNorm, activation functions) and that the split follows inside: their forward's
# fast paths (torch._transformer_encoder_layer_fwd, the encoder's nested tensors) are not
# taken while recording (the recording is a torch function mode), and tracing them
# symbolically fails on their checks of the input (nn.Transformer's batch and feature
# checks, the decoder's and encoder's tgt.is_nested and causal-mask detection), so a model
# holding them is recorded; a TransformerDecoderLayer alone has neither and is traced
COMPOSITE_MODULES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                     nn.TransformerDecoderLayer, nn.Transformer)


def is_leaf_module(module: nn.Module) -> bool:
    """torch.fx's default: ``torch.nn``'s own modules except containers; and except the
    compositions of ``COMPOSITE_MODULES`` (``nn.Transformer``, its encoder, decoder and
    their layers), and a module whose ``forward`` is replaced on the instance (its rule
    would be that of its class: the replacement is followed instead)."""
    if "forward" in vars(module):  # a forward replaced on the instance: recorded inside
        return False
    name = type(module).__module__
    return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, *COMPOSITE_MODULES))


@dataclass
class Recording:
    """A recorded graph and what the recording found out."""

    graph: fx.Graph
    output: Any
    module_outputs: dict[str, Any] = field(default_factory=dict)
    module_inputs: dict[str, fx.Node | tuple[fx.Node, ...]] = field(default_factory=dict)
    value_dependent: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    grad_off: list[tuple[fx.Node, str]] = field(default_factory=list)


def autocast_devices() -> frozenset[str]:
    """The device types on which ``torch.autocast`` is on at this moment."""
    on = set()
    for device in ("cpu", "cuda", "xpu", "mps", "hpu"):
        try:
            if torch.is_autocast_enabled(device):
                on.add(device)
        except RuntimeError:  # a device type this build of torch does not know
            pass
    return frozenset(on)


def autocast_on(values: Any, outside: frozenset[str] = frozenset()) -> bool:
    """Whether ``torch.autocast`` is on for the device of a tensor among ``values``, other
    than the devices in ``outside`` (those it was on for around the call)."""
    return any(t.device.type not in outside and torch.is_autocast_enabled(t.device.type)
               for t in _tensors(values))


def autocast_refusal(what: str) -> UnsupportedOperation:
    """The error for an operation on the input (``what``) under a ``torch.autocast`` that
    the forward enters."""
    return UnsupportedOperation(
        f"{what} runs under a torch.autocast that the forward enters (mixed precision "
        "inside the model): the split computes every operation in its tensors' own dtype, "
        "so g - h would differ from model(x) by autocast's rounding. Explain without "
        "autocast in the forward (cast the model instead, e.g. model.to(torch.bfloat16), "
        "or call the split inside the autocast context)."
    )


class AutocastWatch(TorchFunctionMode):
    """Notes (``seen``) whether an operation of a forward runs under a ``torch.autocast``
    that the forward enters: symbolic tracing does not see the context manager, so its
    graph would leave it out. An autocast around the call applies to the split alike."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False
        self.outside = autocast_devices()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.seen and autocast_on((args, kwargs), self.outside):
            self.seen = True
        return func(*args, **kwargs)


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, state: dict[int, str],
                 twins: dict[int, nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self.autocast_outside = autocast_devices()  # an autocast around the call applies
        # id(a module of the user's model) -> its twin: a forward that reaches the user's
        # modules (a replaced forward closing over the model) calls the twins instead
        self.twins = twins or {}
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.dependent: set[int] = set()  # ids of tensors that depend on an input
        self.state = state  # id(parameter or buffer) -> qualified name
        self.attrs: dict[str, fx.Node] = {}
        self.depth = 0
        self.value_dependent: list[str] = []
        self.random: list[str] = []  # random draws of the forward (recorded or not)
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.module_outputs: dict[str, Any] = {}
        # the graph values of each module call's tensor arguments (the last call's)
        self.module_arguments: dict[str, list[fx.Node]] = {}
        self.bound_at: dict[int, int] = {}  # id -> when its node was bound
        # storage -> [(when, written elements of the storage, node name)], one per write
        self.written: dict[int, list[tuple[int, torch.Tensor, str]]] = {}
        # id(view) -> (its base, the index): views taken by basic indexing
        self.views: dict[int, tuple[torch.Tensor, Any]] = {}
        self.refusal: UnsupportedOperation | None = None  # the first one raised
        # nodes computed from the input with gradients off (the forward's own no_grad)
        self.grad_off: list[tuple[fx.Node, str]] = []
        # the twin shares the user's parameters: one the forward writes into (an EMA kept
        # in a frozen nn.Parameter) is kept here before the first write and put back after
        # the recording (restore_parameters)
        self.parameters = {id(p): p for p in model.parameters()}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_parameter(self, name: str, args: tuple, kwargs: dict) -> None:
        """Keep the value of a parameter that this call writes into (in place, by item
        assignment, through a view taken by indexing, or as ``out=``)."""
        if not (name.startswith(("__i", "__setitem__"))
                or (name.endswith("_") and not name.endswith("__"))
                or kwargs.get("inplace") is True or "out" in kwargs):
            return
        for target in (args[0] if args else None, kwargs.get("out")):
            if not isinstance(target, torch.Tensor):
                continue
            view = self.views.get(id(target))
            param = self.parameters.get(id(view[0] if view is not None else target))
            if param is not None and id(param) not in self.kept:
                self.kept[id(param)] = (param, param.detach().clone())

    def restore_parameters(self) -> None:
        with torch.no_grad():
            for param, value in self.kept.values():
                if param.shape != value.shape:
                    param.resize_(value.shape)
                param.copy_(value)
        self.kept.clear()

    # ------------------------------------------------------------------ values and nodes
    def bind(self, t: torch.Tensor, node: fx.Node, dependent: bool) -> None:
        self.nodes[id(t)] = node
        self.bound_at[id(t)] = len(self.alive)
        self.alive.append(t)
        if dependent:
            self.dependent.add(id(t))
        else:
            self.dependent.discard(id(t))

    def placeholder(self, name: str, t: torch.Tensor) -> None:
        self.bind(t, self.graph.placeholder(name), True)

    def node_of(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            node = self.nodes.get(id(v))
            if node is not None:
                return node
            name = self.state.get(id(v))
            if name is not None:
                if name not in self.attrs:
                    self.attrs[name] = self.graph.get_attr(name)
                return self.attrs[name]
            return v  # a constant, specialised into the graph
        if isinstance(v, (tuple, list)):
            return type(v)(self.node_of(x) for x in v) if type(v) in (tuple, list) else v
        if isinstance(v, dict):
            return {k: self.node_of(x) for k, x in v.items()}
        return v

    def tracked(self, v: Any) -> tuple[bool, bool]:
        """(any recorded or state tensor, any input-dependent tensor) among the leaves."""
        found = dependent = False
        for x in _tensors(v):
            if id(x) in self.nodes or id(x) in self.state:
                found = True
                dependent = dependent or id(x) in self.dependent
        return found, dependent

    def floating_dependent(self, v: Any) -> bool:
        """Whether a floating-point tensor that depends on an input is among the leaves (a
        gradient can flow from it; through a mask or indices none does)."""
        return any(id(x) in self.dependent and x.is_floating_point() for x in _tensors(v))

    def note_grad_off(self, off: bool, written: torch.Tensor, what: str) -> None:
        """Note the node now bound to ``written`` (an item assignment, a write into a view)
        as computed with gradients off."""
        node = self.nodes.get(id(written))
        if off and node is not None:
            self.grad_off.append((node, what))

    def bind_result(self, out: Any, node: fx.Node, dependent: bool) -> None:
        if isinstance(out, torch.Tensor):
            self.bind(out, node, dependent)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.bind(t, self.graph.call_function(operator.getitem, (node, i)),
                              dependent)

    # ------------------------------------------------------------------ torch functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return self.record_call(func, args, kwargs or {})
        except UnsupportedOperation as err:
            # torch turns a TypeError (which this is) raised in a binary operator into
            # NotImplemented ('unsupported operand type(s) for +'): kept for record()
            self.refusal = self.refusal or err
            raise

    def record_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run one torch function or tensor method and record it.

        The forward runs with gradients on (:func:`record`), as in an explanation; each
        operation computes its value with gradients off (no autograd graph is built while
        recording), except the forward's own switches of the gradient mode
        (``torch.no_grad()`` and friends call ``torch._C._set_grad_enabled``), which take
        effect: an operation on a floating-point tensor that depends on the input and that
        then runs with gradients off is noted (``grad_off``; :func:`stop_gradient` tells
        whether one reaches the output, and the backward passes refuse it: :func:`grad_off`).
        """
        grad = torch.is_grad_enabled()  # the forward's own gradient mode at this call
        if self.parameters:
            self.keep_parameter(getattr(func, "__name__", ""), args, kwargs or {})
        if (not self.depth and getattr(func, "__name__", "") in _GRADIENT_HOOKS
                and self.tracked(args)[1]):
            raise UnsupportedOperation(
                f"the forward registers a gradient hook (Tensor.{func.__name__}) on a tensor "
                "computed from the input: it changes the gradient that autograd computes, "
                "which the split's sensitivities do not go through, so they would ignore it. "
                "Explain the model without that hook."
            )
        if func is torch._C._set_grad_enabled:
            out = func(*args, **kwargs)
        else:
            with torch.no_grad():
                out = func(*args, **kwargs)
        if self.depth:
            return out
        if getattr(func, "__name__", "") in RANDOM:
            self.random.append(func.__name__)
        found, dependent = self.tracked((args, kwargs))
        if not found:
            return out
        name = getattr(func, "__name__", "")
        self.check_aliases((args, kwargs), name)
        getter = name == "__get__" and hasattr(func, "__self__")
        if getter:
            name = getattr(func.__self__, "__name__", name)
        if (dependent and any(t.is_floating_point() for t in _tensors(out))
                and autocast_on((args, kwargs), self.autocast_outside)):
            raise autocast_refusal(f"`{name}`")
        # gradients off on a float that depends on the input: a stop-gradient, noted
        off = not grad and dependent and self.floating_dependent((args, kwargs)) and (
            name == "__setitem__" or any(t.is_floating_point() for t in _tensors(out)))
        if name == "__setitem__" and len(args) == 3 and isinstance(args[0], torch.Tensor):
            self.item_assignment(*args, dependent)
            self.note_grad_off(off, args[0], f"{name}()")
            return out
        view = self.views.get(id(args[0])) if args else None
        if (view is not None and name.endswith("_") and not name.endswith("__")
                and getattr(torch.Tensor, name, None) is func):
            self.write_into_view(view, name, args, kwargs, dependent)
            self.note_grad_off(off, view[0], f"{name}()")
            return out
        if not _has_tensor(out):
            if dependent and name not in _QUERIES:
                self.value_dependent.append(name)
            return out
        if getter:
            op, target, fargs = "call_function", getattr, (args[0], name)
        elif (getattr(torch.Tensor, name, None) is func
              or getattr(torch._C.TensorBase, name, None) is func):
            if name in _DUNDERS:
                op, target, fargs = "call_function", _DUNDERS[name], args
            else:
                op, target, fargs = "call_method", name, args
        else:
            op, target, fargs = "call_function", func, args
        node = self.graph.create_node(op, target, self.node_of(tuple(fargs)),
                                      self.node_of(kwargs))
        self.bind_result(out, node, dependent)
        if off:
            self.grad_off.append((node, f"{name}()"))
        if name == "__getitem__" and _basic_index(args[1]):
            self.views[id(out)] = (args[0], args[1])
        return out

    def write_into_view(self, view: tuple[torch.Tensor, Any], name: str, args: tuple,
                        kwargs: dict, dependent: bool) -> None:
        """An in-place method on a view taken by basic indexing (``w[a:b].zero_()``, as
        torchvision's Swin V2 does to a copy of its bias): the method runs out of place on a
        copy of the view, and the result is assigned into the base
        (:meth:`item_assignment`), so later uses of the base see the write."""
        base, index = view
        copy = self.graph.call_method("clone", (self.node_of(args[0]),))
        node = self.graph.call_method(name, (copy, *self.node_of(tuple(args[1:]))),
                                      self.node_of(kwargs))
        dependent = dependent or id(base) in self.dependent
        self.bind(args[0], node, dependent)
        self.item_assignment(base, index, args[0], dependent)
        self.bind(args[0], node, dependent)  # holds the written elements: not stale

    def item_assignment(self, target: torch.Tensor, index: Any, value: Any,
                        dependent: bool) -> None:
        """``target[index] = value``: later uses of ``target`` read an :func:`assign` node;
        older views of the elements it wrote may no longer be used (:meth:`check_aliases`)."""
        node = self.graph.call_function(assign, self.node_of((target, index, value)))
        self.bind(target, node, dependent or id(target) in self.dependent)
        self.depth += 1  # the bookkeeping below is not the model's: not recorded
        try:
            storage = target.untyped_storage()
            mask = torch.zeros(storage.nbytes() // target.element_size(), dtype=torch.bool,
                               device=target.device)
            mask.as_strided(target.size(), target.stride(), target.storage_offset())[index] = True
        finally:
            self.depth -= 1
        self.written.setdefault(storage.data_ptr(), []).append(
            (self.bound_at[id(target)], mask, node.name))

    def check_aliases(self, values: Any, op: str) -> None:
        """Refuse a tensor taken before an item assignment that wrote some of its elements
        (a view of the written tensor, or the tensor it views): its recorded value is stale.

        Views of the same memory whose elements the write did not touch (the other outputs
        of ``chunk``/``unbind``, another slice) stay usable."""
        if not self.written:
            return
        for x in _tensors(values):
            if id(x) not in self.nodes:
                continue
            for when, mask, name in self.written.get(x.untyped_storage().data_ptr(), ()):
                if self.bound_at[id(x)] < when and self._overlaps(x, mask):
                    raise UnsupportedOperation(
                        f"`{op}` reads a tensor whose elements were written in place "
                        f"({name}: x[...] = ... or x[...].op_()) after it was taken, so its "
                        "values may have changed behind the split's back. Clone the tensor "
                        "before the write, or build the result out of place "
                        "(torch.where, torch.cat)."
                    )

    def _overlaps(self, x: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether ``x`` covers an element marked in ``mask`` (its storage's written
        elements); a view with another element size counts as overlapping."""
        if x.element_size() * mask.numel() != x.untyped_storage().nbytes():
            return True
        self.depth += 1
        try:
            return bool(mask.as_strided(x.size(), x.stride(), x.storage_offset()).any())
        finally:
            self.depth -= 1

    # ------------------------------------------------------------------ modules
    def call_module(self, call: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        module = self.twins.get(id(module), module)
        name = self.module_names.get(id(module))
        if self.depth or name is None:
            return call(module, *args, **kwargs)
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and (id(first) in self.nodes or id(first) in self.state):
            self.module_arguments[name] = [
                self.node_of(t) for t in leaves((args, kwargs), torch.Tensor)
                if id(t) in self.nodes or id(t) in self.state]
        if not is_leaf_module(module):
            out = call(module, *args, **kwargs)
        else:
            out = self._leaf(module, name, args, kwargs)
        value = self.node_of(out)
        if isinstance(value, fx.Node) or (
            isinstance(value, tuple) and any(isinstance(v, fx.Node) for v in value)
        ):
            self.module_outputs[name] = value
        return out

    def _leaf(self, module: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
        """A leaf module: its pre-hooks, one ``call_module`` node, its forward hooks."""
        for key, hook in list(module._forward_pre_hooks.items()):
            if key in module._forward_pre_hooks_with_kwargs:
                result = hook(module, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(module, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        found, dependent = self.tracked((args, kwargs))
        if found:
            self.check_aliases((args, kwargs), name)
        if dependent and autocast_on((args, kwargs), self.autocast_outside):
            raise autocast_refusal(f"module {name!r}")
        off = dependent and not torch.is_grad_enabled() and self.floating_dependent(
            (args, kwargs))
        self.depth += 1
        try:
            out = module.forward(*args, **kwargs)
        finally:
            self.depth -= 1
        if found:
            node = self.graph.call_module(name, self.node_of(tuple(args)), self.node_of(kwargs))
            self.bind_result(out, node, dependent)
            if off:
                self.grad_off.append((node, f"the module {name!r}"))
        for key, hook in list(module._forward_hooks.items()):
            if key in module._forward_hooks_with_kwargs:
                result = hook(module, args, kwargs, out)
            else:
                result = hook(module, args, out)
            if result is not None:
                out = result
        return out


def _module_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    recorder = getattr(_STATE, "recorder", None)
    if recorder is None:
        return _ORIGINAL_CALL(module, *args, **kwargs)
    return recorder.call_module(_ORIGINAL_CALL, module, args, kwargs)


_ORIGINAL_CALL = nn.Module.__call__


def stop_gradient(graph: fx.Graph, grad_off: list[tuple[fx.Node, str]]) -> str | None:
    """What the first of the ``grad_off`` nodes computes (their description) whose value
    reaches the graph's output; None where none does (a statistic kept in a buffer, a
    value read for monitoring: no gradient of the output passes them)."""
    live = set(graph.nodes)
    for node, what in grad_off:
        if node not in live:
            continue
        seen, stack = {node}, [node]
        while stack:
            for user in stack.pop().users:
                if user.op == "output":
                    return what
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
    return None


def grad_off(what: str) -> UnsupportedOperation:
    """The refusal of a backward pass through an input-dependent operation that the forward
    runs with gradients off: the split follows the forward's operations, so a stop-gradient
    written that way or a custom backward would be silently ignored by the sensitivities."""
    return UnsupportedOperation(
        f"the forward computes {what} from the input with gradients off: under "
        "torch.no_grad() / torch.set_grad_enabled(False), or inside the forward of a custom "
        "torch.autograd.Function. The split's sensitivities follow the forward's operations, "
        "so they would ignore that stop-gradient or custom backward. Write a stop-gradient "
        "as .detach() (which the split follows), or explain the model without it "
        "(torch.utils.checkpoint: pass use_reentrant=False)."
    )


#: the hook registries of a module (torch keeps them in these attributes)
MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks")


def global_hooks() -> list[str]:
    """The names of torch's registries of global module forward hooks that hold one
    (``register_module_forward_hook`` / ``_pre_hook``)."""
    mod = nn.modules.module
    names = ["_global_forward_hooks", "_global_forward_pre_hooks"]
    return [n for n in names if getattr(mod, n, None)]


def record(model: nn.Module, inputs: tuple[torch.Tensor, ...], extra: tuple = (),
           kwargs: dict | None = None,
           output: Callable[[Any], Any] | None = None) -> Recording:
    """Run ``model(*inputs, *extra, **kwargs)`` once and record it as a graph.

    Parameters
    ----------
    model: torch.nn.Module
        The model (its eval-mode twin runs; the model is not changed).
    inputs: tuple of torch.Tensor
        The split inputs (placeholders of the graph, in this order; the same tensor given
        twice gets two placeholders).
    extra, kwargs:
        Further positional and keyword arguments; the tensors among them
        (:func:`argument_tensors`) are the placeholders after the inputs.
    output: callable, optional
        Picks the tensor to split from the model's output (applied while recording).

    Returns
    -------
    Recording
    """
    if global_hooks():
        raise UnsupportedOperation(
            "global module hooks (torch.nn.modules.module.register_module_forward_hook / "
            "_pre_hook) are registered; the split cannot tell their effect on each module. "
            "Remove them while splitting."
        )
    twin = module_twin(model, training=False)
    state = {id(t): name for name, t in twin.named_buffers()}
    state.update({id(p): name for name, p in twin.named_parameters()})
    twins = {id(m): t for m, t in zip(model.modules(), twin.modules(), strict=True)}
    recorder = _Recorder(twin, state, twins)
    # the forward may write into its inputs (x[:, 0] = ...): it runs on copies (one per
    # tensor, also where it is passed again among the further arguments), so that the
    # caller's tensors keep their values and the split starts from them
    copies: dict[int, torch.Tensor] = {}
    for t in inputs:
        if id(t) not in copies:
            copies[id(t)] = t.detach().clone()
    inputs = tuple(copies[id(t)] for t in inputs)
    extra, kwargs = torch.utils._pytree.tree_map(
        lambda v: copies.get(id(v), v) if isinstance(v, torch.Tensor) else v,
        (tuple(extra), dict(kwargs or {})))
    # the same tensor passed as two inputs, (x, x): each gets its own placeholder (the
    # recorder tells tensors apart by identity), through a view of the same values
    inputs = tuple(t.view_as(t) if any(t is u for u in inputs[:i]) else t
                   for i, t in enumerate(inputs))
    for i, t in enumerate(inputs):
        recorder.placeholder(f"input_{i}", t)
    for i, t in enumerate(argument_tensors(extra, kwargs)):
        node = recorder.graph.placeholder(f"argument_{i}")
        if id(t) not in recorder.nodes:  # the same tensor as an input stays the input
            recorder.bind(t, node, True)
    if getattr(_STATE, "recorder", None) is not None:
        raise RuntimeError("a recording is already running in this thread")
    _STATE.recorder = recorder
    previous = nn.Module.__call__
    nn.Module.__call__ = _module_call
    try:
        # gradients on, as in an explanation: the forward's own no_grad() blocks show
        # (each operation computes its value without autograd: _Recorder.record_call)
        with torch.enable_grad(), recorder:
            out = twin(*inputs, *extra, **(kwargs or {}))
            if output is not None:
                out = output(out)
    except Exception:
        if recorder.refusal is None:
            raise
        raise recorder.refusal from None
    finally:
        nn.Module.__call__ = previous
        _STATE.recorder = None
        recorder.restore_parameters()
    if recorder.refusal is not None:  # raised, and caught by the forward itself
        raise recorder.refusal
    value = recorder.node_of(out)
    recorder.graph.output(value)
    on_input = InputDependent(recorder.graph, len(inputs))
    module_inputs = {name: module_input(arguments, on_input)
                     for name, arguments in recorder.module_arguments.items()}
    return Recording(recorder.graph, value, recorder.module_outputs, module_inputs,
                     list(dict.fromkeys(recorder.value_dependent)),
                     list(dict.fromkeys(recorder.random)), recorder.grad_off)
