"""Tracing a model into a torch.fx graph and naming its nodes after the model's modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from core.errors import UnsupportedOperation


class _SplitTracer(fx.Tracer):
    """A tracer that bypasses hooks of traced-through modules and records container outputs.

    Leaf modules follow torch.fx's default (every ``torch.nn`` module but the containers).
    For each module that is traced through, the node of its first input and of its output
    are recorded so that any name of ``named_modules()`` can be probed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, fx.Node] = {}
        self.inputs: dict[str, fx.Node] = {}

    def call_module(self, m, forward, args, kwargs):  # noqa: D102 - fx's signature
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return self.create_proxy("call_module", name, args, kwargs)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, fx.Proxy):
            self.inputs[name] = first.node
        result = m.forward(*args, **kwargs)  # no user hooks while tracing
        if isinstance(result, fx.Proxy):
            self.outputs[name] = result.node
        return result


@dataclass
class TracedModel:
    """The traced graph of a model and the map from module names to graph nodes."""

    graph: fx.Graph
    nodes: list[fx.Node]
    module_outputs: dict[str, fx.Node] = field(default_factory=dict)
    module_inputs: dict[str, fx.Node] = field(default_factory=dict)


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model`` symbolically.

    Parameters
    ----------
    model: torch.nn.Module
        The model; it is not modified.

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
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise UnsupportedOperation(
            f"could not trace {type(model).__name__} with torch.fx: {err}. The split needs a "
            "static graph: data-dependent control flow (an `if`/loop on tensor values), "
            "tensor-valued indexing by other activations and non-torch code on activations are "
            "not supported. Move such logic out of the forward or make the branch a "
            "constructor argument."
        ) from err
    nodes = list(graph.nodes)
    outputs: dict[str, fx.Node] = {}
    inputs: dict[str, fx.Node] = {}
    for node in nodes:
        if node.op == "call_module":
            outputs[node.target] = node  # a module called twice maps to its last call
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node):
                inputs[node.target] = first
    for name, node in tracer.outputs.items():
        outputs.setdefault(name, node)
    for name, node in tracer.inputs.items():
        inputs.setdefault(name, node)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedOperation(f"{type(model).__name__}.forward takes no tensor input")
    outputs[""] = outputs["input"] = placeholders[0]
    return TracedModel(graph, nodes, outputs, inputs)
