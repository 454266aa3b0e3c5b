"""Running a captured graph on split pairs: :class:`SplitInterpreter` (a ``torch.fx.Interpreter``).

The planner (:func:`plan`) looks up each node's rule in the rule table and decides which nodes
carry split pairs (those that depend on a split input); the interpreter evaluates carried
nodes with their rule and every other node as the model's own operation. After a ReLU-type
unit (``rule.activation``) it applies the forward stabiliser and, when asked, the backward
alpha shift ``S <- factor * S`` (a gradient-only scaling, eqs. 36-41).

Public interface, used by :class:`core.SplitModel` and :mod:`core.lrp`:
``SplitInterpreter.run_pairs`` (a forward pass returning the output and recorded pairs),
``SplitInterpreter.run_rule`` (one node's rule on given arguments), ``SplitInterpreter.steps``
(the plan, one :class:`Step` per node) and ``SplitInterpreter.shift_points``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core import rules
from core.absops import AbsScratch
from core.errors import SplitOverflowError, UnsupportedOperation
from core.graph import Submodules, written_in_place
from core.pair import Pair, contains_pair
from core.shift import Shift
from core.stabilize import stabilise


@dataclass
class Step:
    """The plan of one graph node.

    Attributes
    ----------
    node: torch.fx.Node
        The node.
    rule: core.registry.Rule or None
        Its split-pair rule; None for nodes evaluated as the model's own operation.
    carries: bool
        Whether the node's value is a split pair (or holds pairs).
    module: torch.nn.Module or None
        The leaf module of a ``call_module`` node.
    where: str
        The module path or graph node, for messages.
    shift_name: str or None
        The shift-point name of a ReLU-type unit (module path or node name).
    skip_bias, merged_bias, merged:
        BatchNorm merging (``merge_batchnorm=True``): the affine layer's ``|b|`` is skipped,
        the BatchNorm after it adds ``scale * b`` before taking ``|.|``.
    copy: bool
        A ``get_attr`` whose value the forward writes into: it is fetched as a copy, so that
        running the graph never changes the model's buffers.
    donee: bool
        The pair of the first argument may be written into by this step's ``inplace`` rule:
        it is the only use of a ``fresh`` node (see :meth:`SplitInterpreter.run_rule`).
    """

    node: fx.Node
    rule: Any
    carries: bool
    module: nn.Module | None
    where: str
    shift_name: str | None = None
    skip_bias: bool = False
    merged_bias: torch.Tensor | None = None
    merged: bool = False
    copy: bool = False
    frozen: str | None = None  # what nonlinear="freeze" freezes at this node
    mass_linear: bool = False  # the rule's s backward never reads s values (see Rule)
    donee: bool = False  # its first argument may be donated to it (_plan_donations)

    def bound(self, module: nn.Module | None) -> Step:
        """This step with another module (a shallow copy: ``dataclasses.replace`` runs the
        constructor and costs 20x as much)."""
        step = object.__new__(Step)
        step.__dict__.update(self.__dict__)
        step.module = module
        return step

    @property
    def activation(self) -> bool:
        """A ReLU-type unit (stabiliser and alpha shift apply after it)."""
        return self.rule is not None and self.rule.activation


def _where(node: fx.Node, module: nn.Module | None) -> str:
    """A node described for messages: the module path (``module``: its leaf module) or the
    graph node and its target."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(module).__name__})"
    if node.op == "output":
        return "output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"graph node {node.name!r} ({node.op} {target})"


def _unsupported(step: Step) -> Exception:
    node = step.node
    register = ("register a split-pair rule for it with core.registry.register (one function "
                "that maps the input pairs to the output pair; docs/core.md, 'Rules and the "
                "interpreter').")
    if node.op == "call_module" and (
            isinstance(step.module, nn.DataParallel | nn.parallel.DistributedDataParallel)
            or type(step.module).__name__ == "OptimizedModule"):
        return UnsupportedOperation(
            f"{step.where}: a {type(step.module).__name__} inside the model is not split "
            "through (only a wrapper around the whole model is). Wrap the whole model "
            "instead, or use the module it wraps (.module, or ._orig_mod for torch.compile)."
        )
    if node.op == "call_module":
        fix = ("Replace it by a supported piecewise-linear module (ReLU, ReLU6, LeakyReLU, "
               f"PReLU, Hardtanh, MaxPool, AvgPool, Conv, Linear, BatchNorm, ...), or {register}")
        what = type(step.module).__name__
    else:
        fix = f"Express it with supported tensor operations, or {register}"
        what = getattr(node.target, "__name__", str(node.target))
    return UnsupportedOperation(
        f"{step.where}: {what} is not piecewise linear or has no split-pair rule. {fix}"
    )


def plan(model: nn.Module, graph: fx.Graph, inputs: int,
         merge_batchnorm: bool = False, nonlinear: str = "error",
         modules: dict[str, nn.Module] | None = None) -> dict[fx.Node, Step]:
    """Plan the evaluation of ``graph`` with its first ``inputs`` placeholders split.

    ``modules``: the model's ``dict(named_modules())`` where the caller has it.

    Raises
    ------
    UnsupportedOperation
        For a node that depends on a split input and has no rule, or (``nonlinear="error"``)
        whose rule would freeze a factor (:mod:`core.frozen`).
    """
    submodules = Submodules(model, modules)
    carried: set[fx.Node] = set()
    placeholders = 0
    steps: dict[fx.Node, Step] = {}
    for node in graph.nodes:
        op = node.op
        module = submodules[node.target] if op == "call_module" else None
        step = Step(node, None, False, module, _where(node, module))
        steps[node] = step
        if op == "placeholder":
            placeholders += 1
            if placeholders <= inputs:
                carried.add(node)
                step.carries = True
            continue
        if op == "get_attr" or not any(i in carried for i in node.all_input_nodes):
            continue
        if op == "output":
            step.carries = True
            continue
        if rules.is_query(op, node.target, node.args, node.kwargs):
            continue
        rule = step.rule = rules.lookup(op, node.target, module)
        if rule is None:
            raise _unsupported(step)
        carry = rule.lrp != "none"  # constant_like, gates: evaluated, not a pair
        reason = rule.refuses(node, module) if carry and rule.refuses is not None else None
        if reason is not None:
            raise UnsupportedOperation(f"{step.where}: {reason}")
        if rule.freezes is not None:
            step.frozen = rule.freezes(node, carried, module)
            if step.frozen is not None and nonlinear != "freeze":
                raise UnsupportedOperation(
                    f"{step.where} is not piecewise linear: it has no exact "
                    f"split-pair rule. core.split(model, nonlinear='freeze') splits it with "
                    f"its data-dependent factor frozen at the model's activation "
                    f"({step.frozen}); g - h stays exact, the sensitivities are those of the "
                    "frozen model."
                )
        if carry:
            carried.add(node)
            step.carries = True
        factors = rule.factor_operands(node)
        step.mass_linear = rule.mass_linear and (
            rule.lrp != "product" or _operands_in(node, carried) <= 1
            or (factors is not None and _operands_in(factors, carried) <= 1))
        if rule.activation:
            step.shift_name = node.target if op == "call_module" else node.name
    for node, step in steps.items():
        if node.op == "get_attr":
            step.copy = written_in_place(node)
    _plan_donations(steps)
    if merge_batchnorm:
        _plan_merges(steps)
    return steps


def _plan_donations(steps: dict[fx.Node, Step]) -> None:
    """Mark the steps to which the pair of their first argument may be donated: an
    ``inplace`` rule whose first argument is a ``fresh`` node that has no other use (not
    even a second operand of the same call). Whether it is donated is decided per call
    (:meth:`SplitInterpreter.run_rule`): never under autograd or where the value is kept."""
    for node, step in steps.items():
        if step.rule is None or not step.rule.inplace or not node.args:
            continue
        src = node.args[0]
        prev = steps.get(src) if isinstance(src, fx.Node) else None
        if prev is None or prev.rule is None or not prev.rule.fresh or len(src.users) != 1:
            continue
        step.donee = _operands_in(node, {src}) == 1


def _operands_in(node: fx.Node | list, carried: set[fx.Node]) -> int:
    """How many operands of ``node`` (or how many of the arguments in a list) are carried
    nodes (``x * x`` counts twice)."""
    found: list[fx.Node] = []
    values = node if isinstance(node, list) else (node.args, node.kwargs)
    fx.node.map_arg(values, lambda a: found.append(a) if a in carried else None)
    return len(found)


def _plan_merges(steps: dict[fx.Node, Step]) -> None:
    for step in steps.values():
        if step.rule is None or step.rule.merge != "batchnorm" or not step.carries:
            continue
        src = step.node.args[0]
        prev = steps.get(src) if isinstance(src, fx.Node) else None
        if (prev is not None and prev.rule is not None and prev.rule.merge == "affine"
                and len(src.users) == 1):
            prev.skip_bias = True
            step.merged = True
            step.merged_bias = prev.module.bias


class _SharedProbe(Exception):
    """A probe whose pair cannot become a leaf: its tensor is also the value of a node it
    depends on, or it is no pair (see ``SplitInterpreter.run_pairs``)."""


def _pair_tensors(value: Any, found: set[int]) -> None:
    if isinstance(value, Pair):
        found.update((id(value.d), id(value.s)))
    elif isinstance(value, (list, tuple)):
        for v in value:
            _pair_tensors(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _pair_tensors(v, found)


def _leaf_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where it is a leaf that requires grad and no view (a view's gradient
    goes to its base: a probe at ``Flatten`` of the input got none), else a detached copy
    of it that requires grad."""
    if t.is_leaf and t.requires_grad and t._base is None:
        return t
    return t.detach().requires_grad_(True)


def _leaf(value: Any, inputs: Any) -> Pair:
    """A probe's pair as a leaf of the autograd graph (a split input is one already)."""
    if not isinstance(value, Pair) or value.d is value.s:
        raise _SharedProbe
    found: set[int] = set()
    _pair_tensors(inputs, found)
    if id(value.d) in found or id(value.s) in found:
        raise _SharedProbe
    return Pair(_leaf_tensor(value.d), _leaf_tensor(value.s))


def _separate(value: Any) -> bool:
    """A pair of two distinct tensors of one shape and dtype: either can be written in place
    of a result of its own shape without touching the other."""
    return (isinstance(value, Pair) and value.d is not value.s
            and value.d.shape == value.s.shape and value.d.dtype == value.s.dtype)


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class SplitInterpreter(fx.Interpreter):
    """Evaluates a captured graph on split pairs (sum/difference form, :class:`core.Pair`).

    Parameters
    ----------
    model: torch.nn.Module
        The model whose graph this is (modules and attributes are read from it).
    graph: torch.fx.Graph
        The captured graph.
    inputs: int
        How many leading placeholders are split inputs.
    maxpool, stabilizer, theta, threshold, merge_batchnorm:
        The options of :class:`core.SplitModel`.
    weight_abs: callable
        ``|W|`` of a weight; ``cached_abs``: it returns a kept copy.
    scratch: core.absops.AbsScratch, optional
        Where the affine rules write a ``|W|`` that only their product reads (default: a
        new tensor per layer).
    plans: dict, optional
        Where plans of this graph are kept without their modules, by ``nonlinear``, between
        interpreters of the same model (:attr:`core.capture.Captured.plans`): a kept plan is
        bound to this model's modules instead of planned again. The caller guarantees that
        the model is unchanged since it was kept (:mod:`core.reuse`).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, inputs: int, *, maxpool: str,
                 stabilizer: str, theta: float, threshold: float, merge_batchnorm: bool,
                 weight_abs: Callable[[torch.Tensor], torch.Tensor],
                 cached_abs: bool = False, scratch: AbsScratch | None = None,
                 nonlinear: str = "error", plans: dict | None = None) -> None:
        super().__init__(model, garbage_collect_values=True, graph=graph)
        self.extra_traceback = False  # keep the exceptions' arguments as they are
        self.inputs = inputs
        self.maxpool, self.stabilizer = maxpool, stabilizer
        self.theta, self.threshold = theta, threshold
        self.weight_abs, self.cached_abs = weight_abs, cached_abs
        kept = plans.get(nonlinear) if plans is not None else None
        if kept is None:
            self.steps = plan(model, graph, inputs, nonlinear=nonlinear, modules=self.submodules)
            if plans is not None:
                plans[nonlinear] = {n: s if s.module is None else s.bound(None)
                                    for n, s in self.steps.items()}
        else:
            modules = Submodules(model, self.submodules)
            self.steps = {n: s.bound(modules[n.target]) if n.op == "call_module" else s
                          for n, s in kept.items()}
        if merge_batchnorm:
            _plan_merges(self.steps)
        self._ctx = {node: rules.Ctx(maxpool, s.where, s.module, s.skip_bias, s.merged_bias,
                                     weight_abs, cached_abs, scratch=scratch)
                     for node, s in self.steps.items() if s.rule is not None}
        # (node, mass, donated) -> a Ctx with those fields, made when first needed
        self._ctx_variants: dict[tuple[fx.Node, bool, bool], rules.Ctx] = {}
        self._free: set[fx.Node] = set()
        self._leaves: set[fx.Node] = set()  # see run_pairs
        self._detached: set[fx.Node] = set()
        self._factors: Shift | None = None
        self._record: set[fx.Node] = set()
        self._record_all = False
        self._keep_parts = False
        self._records: dict[fx.Node, Any] = {}
        self._placeholder_index = 0

    # ------------------------------------------------------------------ public interface
    @property
    def output_node(self) -> fx.Node:
        """The graph's output node."""
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def frozen_operations(self) -> list[str]:
        """The frozen operations in graph order, each with what is frozen."""
        return [f"{s.where}: {s.frozen}" for s in self.steps.values() if s.frozen is not None]

    def frozen_after(self) -> dict[fx.Node, tuple[str, ...]]:
        """For every node, the frozen operations on a path from it to the output."""
        found: dict[fx.Node, set[str]] = {}
        names = {n: f"{s.where}: {s.frozen}" for n, s in self.steps.items()
                 if s.frozen is not None}
        for node in reversed(list(self.steps)):
            here: set[str] = set()
            for user in node.users:
                here |= found.get(user, set())
                if user in names:
                    here.add(names[user])
            found[node] = here
        order = {name: i for i, name in enumerate(names.values())}
        return {n: tuple(sorted(v, key=order.get)) for n, v in found.items()}

    def shift_points(self) -> list[str]:
        """``"input"``, the ReLU-type units in graph order and ``"output"``."""
        names = ["input"]
        for step in self.steps.values():
            if step.activation and step.shift_name not in names:
                names.append(step.shift_name)
        return names + ["output"]

    def mass_free(self, probes: Iterable[fx.Node]) -> set[fx.Node]:
        """The carried nodes whose ``s`` values a backward pass to ``probes`` never reads.

        Those are the nodes that are not ancestors of a probe, provided that every one of
        them has a ``mass_linear`` step (the backward of the ``s`` stream through it does not
        depend on ``s``; stabilisers are value-only); otherwise none (the empty set).
        """
        needed: set[fx.Node] = set()
        stack = list(probes)
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        free = {n for n, s in self.steps.items()
                if s.carries and s.rule is not None and n not in needed}
        if any(not self.steps[n].mass_linear for n in free):
            return set()
        return free

    def grad_free(self, probes: Iterable[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
        """What ``run_pairs(leaves=probes)`` runs without autograd.

        Returns
        -------
        tuple of set
            The probes that no other probe depends on (they become leaves) and the nodes
            that run without autograd (those leaves' own rules and every node that depends
            on no leaf); two empty sets where the leaves are split inputs (nothing lies
            below them).
        """
        probes = set(probes)
        above: set[fx.Node] = set()
        stack = [u for p in probes for u in p.users]
        while stack:
            node = stack.pop()
            if node not in above:
                above.add(node)
                stack.extend(node.users)
        leaves = probes - above
        if all(n.op == "placeholder" for n in leaves):  # nothing lies below them
            return set(), set()
        return leaves, {n for n in self.steps if n not in above}

    def run_pairs(self, inputs: Sequence[Pair], extra: Sequence[Any] = (), *,
                  factors: Shift | None = None, record: Iterable[fx.Node] = (),
                  record_all: bool = False, mass_free: Iterable[fx.Node] = (),
                  leaves: Iterable[fx.Node] = (), keep_parts: bool = False,
                  ) -> tuple[Any, dict[fx.Node, Any]]:
        """One forward pass on split pairs.

        Parameters
        ----------
        inputs: sequence of Pair
            The split inputs, one per split placeholder.
        extra: sequence
            Values of the further placeholders (not split).
        factors: core.shift.Shift, optional
            The backward alpha shift (its ``apply`` at every shift point, see
            :meth:`shift_points`).
        record: iterable of fx.Node
            Nodes whose values to return (``record_all``: every node).
        mass_free: iterable of fx.Node
            Nodes whose ``s`` values nobody reads (from :meth:`mass_free`; under autograd):
            their rules may return placeholders for ``s`` whose backward is exact, and no
            stabiliser runs there. The output's ``s`` is then not a value either.
        leaves: iterable of fx.Node
            Nodes (the probes of a backward pass) whose pairs become leaves of the autograd
            graph (under autograd): the nodes that do not depend on one of them run without
            autograd -- no backward graph is built where no backward pass goes -- and their
            values are constants for the backward pass, as they are for a backward pass to
            the probes anyway. The gradients at the leaves are bit for bit those at the
            probes' tensors of a run without ``leaves``, with one exception that this method
            avoids: a probe whose tensor is also the value of a node it depends on (an
            identity rule, an element of a tuple), where the gradient at that tensor sums
            over the users of both nodes; such a call runs again without ``leaves``.

        keep_parts: bool
            The ``"scale"`` stabiliser keeps the parts ``a+- = (s +- d) / 2`` non-negative: a
            mass it lowers stays at least ``|d|`` (``s <- max(theta^k s, |d|)``; SplitLRP,
            whose rules share relevance in proportion to the parts).

        Returns
        -------
        tuple
            The output value and the recorded values by node (before the alpha shift).
        """
        self._factors = factors
        self._keep_parts = keep_parts
        self._record = set(record)
        self._record_all = record_all
        self._free = set(mass_free)
        self._leaves, self._detached = self.grad_free(leaves) if torch.is_grad_enabled() else (
            set(), set())
        try:
            try:
                return self._run(inputs, extra)
            except _SharedProbe:
                self._leaves, self._detached = set(), set()
                return self._run(inputs, extra)
        finally:
            self.env = {}
            self._records = {}
            self._factors = None
            self._keep_parts = False
            self._free = set()
            self._leaves, self._detached = set(), set()

    def _run(self, inputs: Sequence[Pair], extra: Sequence[Any]) -> tuple[Any, dict]:
        self._records = {}
        self._placeholder_index = 0
        self.env = {}
        out = self.run(*inputs, *extra, enable_io_processing=False)
        return out, self._records

    def ctx(self, step: Step) -> rules.Ctx:
        """The context a step's rule is called with."""
        return self._ctx[step.node]

    def run_rule(self, step: Step, args: tuple, kwargs: dict, donated: bool = False) -> Any:
        """Apply a step's rule; an error from it gets a note naming the step.

        ``donated``: the rule may write into the tensors of its first argument's pair
        (``ctx.donated``); :meth:`run_pairs` donates them where nothing else reads them: no
        autograd, a planned donation (:attr:`Step.donee`), neither the argument nor the step
        a leaf nor the argument's value recorded, and a pair of two distinct tensors of one
        shape and dtype.
        """
        ctx = self._ctx[step.node]
        key = (step.node, step.node not in self._free, donated)
        if key[1:] != (ctx.mass, ctx.donated):
            ctx = self._ctx_variants.get(key) or self._ctx_variants.setdefault(
                key, dataclasses.replace(ctx, mass=key[1], donated=key[2]))
        try:  # fx hands immutable containers; rules get plain ones
            return step.rule(ctx, tuple(args), dict(kwargs))
        except (UnsupportedOperation, SplitOverflowError):
            raise
        except Exception as err:
            err.add_note(f"while splitting {step.where}")
            raise

    def _donates(self, step: Step, args: tuple) -> bool:
        if not step.donee or torch.is_grad_enabled():
            return False
        src = step.node.args[0]
        # a leaf's tensors must not be its argument's (see _leaf)
        if (self._record_all or src in self._record or src in self._leaves
                or step.node in self._leaves):
            return False
        return bool(args) and _separate(args[0])

    # ------------------------------------------------------------------ fx.Interpreter
    def run_node(self, n: fx.Node) -> Any:  # noqa: D102 - fx's signature
        step = self.steps[n]
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "output":
            return args[0]
        if n not in self._detached:
            value = self._value(n, step, args, kwargs)
            self._keep(n, value)
            return self._shifted(n, step, value)
        with torch.no_grad():
            value = self._value(n, step, args, kwargs)
        if n not in self._leaves:
            self._keep(n, value)
            with torch.no_grad():
                return self._shifted(n, step, value)
        value = _leaf(value, (args, kwargs))
        self._keep(n, value)
        return self._shifted(n, step, value)

    def _shifted(self, n: fx.Node, step: Step, value: Any) -> Any:
        """The value after the alpha shift of a split input or a ReLU-type unit."""
        if self._factors is None or not isinstance(value, Pair):
            return value
        if n.op == "placeholder":
            return self._factors.apply("input", value, n.name)
        if step.activation:
            return self._factors.apply(step.shift_name, value, n.name)
        return value

    def _value(self, n: fx.Node, step: Step, args: tuple, kwargs: dict) -> Any:
        """The value of a node (stabilised after a ReLU-type unit)."""
        if n.op == "placeholder":
            value = self.placeholder(n.target, args, kwargs)
            index = self._placeholder_index
            self._placeholder_index += 1
            if index < self.inputs and not isinstance(value, Pair):
                raise TypeError(f"split input {n.target!r} must be a Pair")
            return value
        if n.op == "get_attr":
            value = _fetch_attr(self.module, n.target)
            if isinstance(value, torch.Tensor):
                value = value.detach().clone() if step.copy else value.detach()
        elif step.rule is None or not contains_pair((args, kwargs)):
            value = self._static(n, step, args, kwargs)
        else:
            value = self.run_rule(step, args, kwargs, self._donates(step, args))
            # a frozen unit whose result is a constant (attention with a constant value
            # tensor) is no pair: nothing to stabilise or shift
            if step.activation and isinstance(value, Pair) and n not in self._free:
                # a fresh s is this call's own: without autograd it is stabilised in place
                inplace = (step.rule.fresh and not torch.is_grad_enabled()
                           and _separate(value))
                value = Pair(value.d, stabilise(value.d, value.s, self.stabilizer, self.theta,
                                                self.threshold, inplace=inplace,
                                                d_nonnegative=step.rule.relu,
                                                keep_parts=self._keep_parts))
        return value

    def _keep(self, node: fx.Node, value: Any) -> None:
        if self._record_all or node in self._record:
            self._records[node] = value

    def _static(self, n: fx.Node, step: Step, args: tuple, kwargs: dict) -> Any:
        """The model's own operation on plain values (``d`` of pairs)."""

        def plain(v: Any) -> Any:
            return v.d if isinstance(v, Pair) else v

        args = fx.node.map_aggregate(args, plain)
        kwargs = fx.node.map_aggregate(kwargs, plain)
        try:
            if n.op == "call_module":
                return step.module.forward(*args, **kwargs)
            if n.op == "call_method":
                return getattr(args[0], n.target)(*args[1:], **kwargs)
            return n.target(*args, **kwargs)
        except Exception as err:
            err.add_note(f"while evaluating {step.where}")
            raise
