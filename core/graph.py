"""Tracing a model into a torch.fx graph and naming its nodes after the model's modules."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core import rules
from core.errors import UnsupportedOperation
from core.record import COMPOSITE_MODULES, InputDependent, leaves, module_input
from core.twin import module_twin


class _InPlaceProxy(fx.Proxy):
    """A proxy that records augmented assignments (``x += y``) as the in-place operators.

    ``fx.Proxy`` has no ``__iadd__``, so Python falls back to ``x = x + y`` and the graph
    loses that the tensor which ``x`` named was written to (another name for it still sees
    the write in eager mode). :func:`resolve_inplace` restores that aliasing.
    """

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


_ATOMS = frozenset({type(None), bool, int, float, str})
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_PAIR_FUNCTIONS = frozenset(getattr(F, f"{kind}max_pool{n}d_with_indices")
                            for kind in ("", "adaptive_") for n in (1, 2, 3))


class _SplitTracer(fx.Tracer):
    """A tracer that bypasses hooks of traced-through modules and records container outputs.

    Leaf modules follow torch.fx's default (every ``torch.nn`` module but the containers),
    except the compositions of :data:`core.record.COMPOSITE_MODULES` (traced through).
    For each module that is traced through, the nodes of its tensor arguments and of its
    output are recorded so that any name of ``named_modules()`` can be probed; each leaf
    module called, by its path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, fx.Node | tuple[fx.Node, ...]] = {}
        self.inputs: dict[str, list[fx.Node]] = {}  # the nodes of a call's tensor arguments
        self.leaves: dict[str, nn.Module] = {}  # the modules of the call_module nodes
        self._leaf_types: dict[type, bool] = {}
        #: the first node made with gradients off (tracing runs with them on)
        self.grad_off: fx.Node | None = None

    def release(self) -> None:
        """Drop the references to the traced module tree. ``Tracer.trace`` leaves the tracer
        in a reference cycle (a recursive local function that holds it), so without this the
        traced copy of the model and its buffers would live until the garbage collector's
        next run instead of going when the capture no longer needs them."""
        self.root = None
        self.tensor_attrs = {}
        self.leaves = {}

    def create_node(self, kind, target, args, kwargs, name=None,  # noqa: D102 - fx's
                    type_expr=None):
        # made without its arguments, which are set right after: ``Graph.create_node`` walks
        # the arguments of every call with torch's pytree for raw symbolic integers
        # (``SymInt``, a warning), which symbolic tracing never passes; that walk was an
        # eighth of tracing ResNet50. The node, its name and its users are the same.
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if self.grad_off is None and kind.startswith("call_") and not torch.is_grad_enabled():
            self.grad_off = node  # under the forward's own no_grad(): core.record refuses
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:  # noqa: D102 - fx's signature
        return _InPlaceProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):  # noqa: D102
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if (target in _PAIR_FUNCTIONS if kind == "call_function" else
                kind == "call_module" and isinstance(self.leaves.get(target), _POOLS)
                and self.leaves[target].return_indices):
            # max pooling with its indices: (values, indices) as a real tuple, so that the
            # forward's Python sees one (``isinstance(out, tuple)`` and ``len(out)`` of a
            # proxy would trace a graph that differs from the eager forward)
            return proxy[0], proxy[1]
        return proxy

    # fast paths: fx's own methods test every argument and attribute against
    # ``nn.Parameter`` (a Python ``__instancecheck__``) before anything else
    def create_arg(self, a: Any) -> Any:  # noqa: D102 - fx's signature
        t = type(a)
        if t is _InPlaceProxy:
            return a.node
        if t in _ATOMS:
            return a
        if t is tuple:
            return tuple([self.create_arg(v) for v in a])
        if t is list:
            return [self.create_arg(v) for v in a]
        if t is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # noqa: D102 - fx's signature
        if type(attr_val) in _ATOMS or isinstance(attr_val, nn.Module):
            return attr_val  # what fx returns for anything but a parameter or a tensor
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        if "forward" in vars(m):  # a forward replaced on the instance: traced through it
            return False
        leaf = self._leaf_types.get(type(m))
        if leaf is None:  # fx decides by the class (its module and Sequential)
            leaf = self._leaf_types[type(m)] = super().is_leaf_module(
                m, module_qualified_name) and not isinstance(m, COMPOSITE_MODULES)
        return leaf

    def call_module(self, m, forward, args, kwargs):  # noqa: D102 - fx's signature
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            self.leaves[name] = m
            return self.create_proxy("call_module", name, args, kwargs)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, fx.Proxy):
            self.inputs[name] = [p.node for p in leaves((args, kwargs), fx.Proxy)]
        result = m.forward(*args, **kwargs)  # no user hooks while tracing
        if isinstance(result, fx.Proxy):
            self.outputs[name] = result.node
        elif isinstance(result, tuple) and result and all(isinstance(r, fx.Proxy)
                                                          for r in result):
            self.outputs[name] = tuple(r.node for r in result)
        return result


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
# ops whose result shares memory with their first argument: an in-place op on the result
# also changes the source, which a graph without aliasing cannot express
_VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "narrow", "transpose", "permute",
                 "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split", "unbind", "t",
                 "unflatten", "movedim", "swapaxes", "swapdims", "select", "as_strided", "unfold"}


class Submodules:
    """A model's modules by path, from one walk of ``named_modules()`` (``get_submodule``
    walks the path through ``nn.Module.__getattr__`` at every call); a path that the walk
    does not list (the second name of a module that appears twice) is looked up.

    Parameters
    ----------
    model: torch.nn.Module
        The model.
    paths: dict, optional
        Its ``dict(model.named_modules())`` where the caller has it already.
    """

    def __init__(self, model: nn.Module, paths: dict[str, nn.Module] | None = None) -> None:
        self.model = model
        self._paths = paths

    def __getitem__(self, path: str) -> nn.Module:
        if self._paths is None:
            self._paths = dict(self.model.named_modules())
        module = self._paths.get(path)
        return self.model.get_submodule(path) if module is None else module


def _writes_into(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (
        (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
        or node.kwargs.get("inplace") is True
    )


def written_in_place(node: fx.Node) -> bool:
    """Whether a user of ``node`` writes into its value in place (``x.add_(y)``, ``x += y``,
    ``F.relu(x, inplace=True)`` with ``x`` the value of ``node``): of a ``get_attr`` node,
    a forward that writes into a parameter or buffer."""
    return any(_writes_into(u) and u.args and u.args[0] is node for u in node.users)


def _mutates(node: fx.Node, modules: Submodules, signatures: dict[Any, Any]) -> bool:
    """Whether ``node`` writes into its first argument (``x.add_(y)``, ``x += y``,
    ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``); ``signatures`` caches the
    functions' signatures."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return _inplace_module(modules[node.target])
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    if len(node.args) == 1 and not node.kwargs:
        return False  # only the tensor is passed: no inplace=True
    try:
        signature = signatures[node.target]
    except (KeyError, TypeError):  # not seen yet, or an unhashable target
        signature = _signature(node.target)
        try:
            signatures[node.target] = signature
        except TypeError:
            pass
    if signature is None:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def _inplace_module(module: nn.Module) -> bool:
    """``module.inplace is True``, without the exception that ``nn.Module.__getattr__``
    raises (with its message) for the modules that have no such attribute."""
    state = module.__dict__
    if "inplace" in state:
        return state["inplace"] is True
    cls = type(module)
    if cls.__getattr__ is nn.Module.__getattr__ and not hasattr(cls, "inplace"):
        return False  # that __getattr__ finds parameters, buffers and modules: never True
    return getattr(module, "inplace", False) is True


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and (
        node.target is operator.getitem or getattr(node.target, "__name__", "") in _VIEW_METHODS
    )


def _is_scalar(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether the value of ``node`` is a Python number or shape: a query (``x.size()``,
    ``x.shape``) or arithmetic on queries only (``memo`` keeps the answers; a walk back
    through the inputs without recursion, so a long chain of operations cannot exhaust
    Python's stack)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        inputs = n.all_input_nodes
        if rules.is_query(n.op, n.target, n.args, n.kwargs):
            memo[n] = True
        elif n.op != "call_function" or not inputs:
            memo[n] = False
        else:
            pending = [i for i in inputs if i not in memo]
            if pending:
                stack += pending
                continue
            memo[n] = all(memo[i] for i in inputs)
        stack.pop()
    return memo[node]


def _sum_dims(node: fx.Node) -> Any:
    """The ``dim`` of a ``torch.sum`` / ``x.sum`` node, None where it also has ``keepdim``
    or ``dtype`` (or no ``dim``)."""
    names = ("input", "dim", "keepdim")
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if bound.get("keepdim") or bound.get("dtype") is not None or set(bound) - {*names,
                                                                               "dtype"}:
        return None
    dim = bound.get("dim")
    if isinstance(dim, (tuple, list)):
        dim = dim[0] if len(dim) == 1 else None
    return dim if isinstance(dim, int) else None


def fold_stacked_sums(graph: fx.Graph) -> None:
    """Write ``torch.sum(torch.stack([a, b], dim), dim)`` as ``a + b``.

    The same value bit for bit (a sum of two numbers rounds once); Zennit's canonizers
    (``ResNetCanonizer``) write a residual add that way (a ``Sum`` module over a stack), and
    SplitLRP's residual rule applies to an add, so that a canonizer does not change the
    relevance. The node keeps its identity (a module output stays where it was); the
    stack stays for its other users.
    """
    for node in graph.nodes:
        if not ((node.op == "call_function" and node.target is torch.sum)
                or (node.op == "call_method" and node.target == "sum")) or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_function"
                and src.target is torch.stack):
            continue
        tensors = src.args[0] if src.args else src.kwargs.get("tensors")
        stacked = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        dim = _sum_dims(node)
        if (dim is None or dim != stacked or not isinstance(tensors, (tuple, list))
                or len(tensors) != 2):
            continue
        node.op, node.target = "call_function", operator.add
        node.args, node.kwargs = (tensors[0], tensors[1]), {}


def resolve_inplace(graph: fx.Graph, modules: Submodules) -> None:
    """Give in-place ops their eager semantics in the graph.

    torch.fx records ``x.add_(y)`` as a node, but later uses of ``x`` still refer to the node
    that produced ``x`` before the write. Those uses are redirected to the in-place node,
    whose value is the updated tensor. A write into a view of another activation (which
    would change that activation too) is rejected. ``modules`` finds the modules that
    ``call_module`` nodes name (their ``inplace`` flags).
    """
    signatures: dict[Any, Any] = {}
    writes = [n for n in graph.nodes if _mutates(n, modules, signatures)]
    if not writes:
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    scalars: dict[fx.Node, bool] = {}
    for node in writes:
        if _is_scalar(node.args[0], scalars):
            continue  # `n += 1` on a size rebinds a Python number: no aliasing
        target = node.args[0]
        later = [u for u in target.users if order[u] > order[node]]
        source = target
        while _is_view(source) and isinstance(source.args[0], fx.Node):
            source = source.args[0]
            if any(order[u] > order[node] for u in source.users):
                raise UnsupportedOperation(
                    f"graph node {node.name!r} ({node.target}) writes in place into a view of "
                    f"the activation {source.name!r}, which is used again later; the split "
                    "cannot follow the aliasing. Use the out-of-place operation."
                )
        views = [u for u in target.users if order[u] < order[node] and _is_view(u)]
        while views:
            view = views.pop()
            if any(order[u] > order[node] for u in view.users if not _is_view(u)):
                raise UnsupportedOperation(
                    f"graph node {node.name!r} ({node.target}) writes in place into "
                    f"{target.name!r}, whose view {view.name!r} is used again later; the split "
                    "cannot follow the aliasing. Use the out-of-place operation."
                )
            views += [u for u in view.users if _is_view(u)]
        if later:
            target.replace_all_uses_with(node, delete_user_cb=lambda u, later=later: u in later)


class TraceFailure(UnsupportedOperation):
    """torch.fx could not trace the forward symbolically (the split then records it)."""


@dataclass
class TracedModel:
    """The traced graph of a model and the map from module names to graph nodes (a module's
    input: a tuple of nodes where it is called with several input-dependent tensors, see
    :func:`core.record.module_input`)."""

    graph: fx.Graph
    nodes: list[fx.Node]
    module_outputs: dict[str, fx.Node] = field(default_factory=dict)
    module_inputs: dict[str, fx.Node | tuple[fx.Node, ...]] = field(default_factory=dict)


def constant(value: Any) -> Any:
    """A tensor constant that torch.fx stored on the traced copy (``_tensor_constant0``)."""
    return value


def _attribute(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _keep_constants(graph: fx.Graph, model: nn.Module, twin: nn.Module) -> None:
    """``get_attr`` nodes of tensor constants that fx created on the traced copy (not on the
    model) become calls returning the constant."""
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        try:
            _attribute(model, node.target)
        except AttributeError:
            with graph.inserting_before(node):
                kept = graph.call_function(constant, (_attribute(twin, node.target),))
            node.replace_all_uses_with(kept)
            graph.erase_node(node)


def trace(model: nn.Module, concrete_args: dict[str, Any] | None = None) -> TracedModel:
    """Trace ``model`` symbolically.

    Parameters
    ----------
    model: torch.nn.Module
        The model; it is not modified.
    concrete_args: dict, optional
        Forward arguments fixed to these values (torch.fx's ``concrete_args``).

    Returns
    -------
    TracedModel
        The graph and the nodes at which each module's output (and input) appear.

    Raises
    ------
    UnsupportedOperation
        When the forward cannot be traced (data-dependent control flow, for example).
    """
    tracer = _SplitTracer()
    leaves = tracer.leaves
    try:
        # torch.fx runs Python code on real buffers (``self.calls += 1``): trace a copy of the
        # module tree that shares the parameters and owns copies of the buffers
        twin = module_twin(model, training=False)  # capture runs in eval mode
        with torch.enable_grad():  # as in an explanation: the forward's no_grad() shows
            graph = tracer.trace(twin, concrete_args=concrete_args or None)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise TraceFailure(
            f"could not trace {type(model).__name__} with torch.fx: {type(err).__name__}: {err}"
        ) from err
    finally:
        tracer.release()
    if tracer.grad_off is not None:  # recorded eagerly, where input dependence is known
        raise TraceFailure(f"the forward runs {tracer.grad_off.target} with gradients off")
    _keep_constants(graph, model, twin)
    try:
        resolve_inplace(graph, Submodules(twin, leaves))
    except UnsupportedOperation as err:  # eager recording follows writes into slices
        raise TraceFailure(*err.args) from None
    fold_stacked_sums(graph)
    nodes = list(graph.nodes)
    dependent = InputDependent(graph, 1)  # the nodes computed from the input
    outputs: dict[str, fx.Node] = {}
    inputs: dict[str, fx.Node | tuple[fx.Node, ...]] = {}
    for node in nodes:
        if node.op == "call_module":
            outputs[node.target] = node  # a module called twice maps to its last call
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node):
                inputs[node.target] = module_input(node.all_input_nodes, dependent)
    for name, node in tracer.outputs.items():
        outputs.setdefault(name, node)
    for name, arguments in tracer.inputs.items():
        inputs.setdefault(name, module_input(arguments, dependent))
    if not any(n.op == "placeholder" for n in nodes):
        raise UnsupportedOperation(f"{type(model).__name__}.forward takes no tensor input")
    return TracedModel(graph, nodes, outputs, inputs)

