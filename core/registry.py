"""The rule table: each operation's split-pair rule and what the engine needs to know about it.

A :class:`Rule` is one small unit: a function ``fn(ctx, args, kwargs) -> value`` that maps the
split pairs of a node's inputs to the split pair of its output (its docstring states the
formula), plus the metadata that the rest of the engine reads from it -- nothing else in the
engine matches operations by identity or by name:

``lrp``
    How SplitLRP (:mod:`core.lrp`) sends relevance back through the operation:
    ``"epsilon"`` (it mixes neurons: affine maps, BatchNorm, averaging, convex max pooling
    outside ``maxpool="wta"``), ``"structural"`` (it moves values without mixing them: views,
    slicing, concatenation, padding), ``"activation"`` (a ReLU-type unit: relevance passes),
    ``"sum"`` (a sum of two activations, a residual add: see ``signs``), ``"maxpool"``
    (``"epsilon"`` in convex mode, ``"structural"`` in winner-takes-all mode), ``"index"``
    (an element of a tuple of pairs) or ``"none"`` (the result is not a pair).
``activation``
    A ReLU-type unit: the forward stabiliser and the backward alpha shift apply after it
    (a shift point, eqs. 36-41).
``relu``
    Exactly ``relu(z)``: SplitLRP's ``activation_rule="wta"`` hands the g stream's relevance
    to the winning pre-activation.
``signs``
    For ``lrp == "sum"``: the sign with which each of the two operands enters the sum
    (``a - b`` is ``(1, -1)``).
``query``
    The result is a Python value computed from the activation's metadata (``x.size()``,
    ``x.shape``): it is never a pair.
``freezes``
    For an operation that is not piecewise linear (:mod:`core.frozen`): a check
    ``freezes(node, carried, module) -> str | None`` that describes what is frozen at that
    graph node (None: split exactly there; ``module``: the leaf module of a ``call_module``
    node). Such nodes need ``core.split(model, nonlinear="freeze")``.
``constant``
    The result is a constant (a frozen gate such as ``sigmoid``), never a pair.
``mass_linear``
    The output's ``s`` is a linear map of the inputs' ``s`` whose coefficients never read
    ``s`` (they come from ``d``, the weights or constants), so that the backward pass of the
    ``s`` stream does not depend on the values of ``s``. For a ``"product"`` rule this holds
    when only one operand is a pair (the planner checks that). The sensitivities skip the
    ``s`` values above their deepest probe where every rule there has it
    (:meth:`core.interpreter.SplitInterpreter.mass_free`); a rule called with
    ``ctx.mass == False`` may return any value for ``s`` whose backward is exact.
``exponent``
    For a ``"product"`` rule that raises one activation to a power (``a ** n``,
    ``a.square()``): ``exponent(node) -> int | None``, the power at that graph node (None:
    not an integer >= 1). SplitLRP shares the relevance evenly among the ``n`` factors.
``factors``
    For a ``"product"`` rule whose operands are not all factors of the product
    (``torch.addmm(input, mat1, mat2) = beta input + alpha mat1 @ mat2``): the factors'
    ``(position, keyword)`` in the call, ``((1, "mat1"), (2, "mat2"))``. SplitLRP then shares
    the relevance evenly between the factors only where both are activations, and the other
    operands (the added ``input``) keep their epsilon-rule share; ``mass_linear`` then needs at
    most one factor that is a pair. None: every operand is a factor.
``merge``
    The part an operation plays in BatchNorm merging (``merge_batchnorm=True``):
    ``"affine"`` (a layer whose bias a BatchNorm right after it may take over) or
    ``"batchnorm"`` (the BatchNorm that merges into such a layer).
``refuses``
    ``refuses(node, module) -> str | None``: why this graph node cannot be split at all
    (checked when the split is planned, before any input is seen), or None.
``fresh``
    Without autograd the rule's pair is memory of its own: new tensors (or those of a
    donated argument, below), never a view or an alias of an argument, a parameter or a
    constant.
``inplace``
    The rule may write its result into the tensors of its first argument's pair when the
    interpreter donates them (``ctx.donated``, :mod:`core.interpreter`): without autograd,
    where that argument is the only use of a ``fresh`` node whose value nothing keeps. The
    result is bit for bit the out-of-place one; donating saves the allocation of a new
    tensor (on CPU, for large activations, fresh memory that the operating system maps page
    by page).

How to add an operation
-----------------------
Write its rule function in :mod:`core.rules` (or a module imported by it) and decorate it
with :func:`register`, naming what it handles -- ``torch.nn.Module`` subclasses (leaf modules,
matched with ``isinstance`` in registration order), functions (``call_function`` nodes, such
as ``torch.relu`` or ``operator.add``) or method names (``call_method`` nodes, ``"relu"``) --
and its metadata::

    @register(nn.ReLU, torch.relu, F.relu, "relu", lrp="activation", activation=True)
    def relu(ctx, args, kwargs):
        '''ReLU: ``d' = relu(d)``, ``s' = s + relu(-d)``.'''
        ...

That is the only place to touch: the planner (:mod:`core.split`), SplitLRP and the shift
points read the metadata from the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import UnsupportedOperation
from core.pair import contains_pair

LRP_KINDS = ("epsilon", "structural", "activation", "sum", "maxpool", "index", "none",
             "product")


@dataclass
class Ctx:
    """What a rule may need besides its arguments.

    Attributes
    ----------
    maxpool: str
        ``"convex"`` or ``"wta"``.
    where: str
        The module path or graph node, for error messages.
    module: torch.nn.Module or None
        The leaf module of a ``call_module`` node.
    skip_bias: bool
        The ``|b|`` of this affine layer is merged into the BatchNorm after it.
    merged_bias: torch.Tensor or None
        For a BatchNorm merged into the affine layer before it: that layer's bias.
    weight_abs: callable
        ``|W|`` of a weight (possibly kept between calls).
    cached_abs: bool
        ``weight_abs`` returns a kept ``|W|``: use it directly.
    mass: bool
        False where nothing reads the value of this node's ``s`` (only its backward pass):
        a ``mass_linear`` rule may then return a placeholder whose backward is exact.
    scratch: core.absops.AbsScratch or None
        Where an affine rule writes the ``|W|`` that only its product reads.
    donated: bool
        The tensors of the first argument's pair are this call's alone (an ``inplace``
        rule may write into them; never under autograd).
    """

    maxpool: str
    where: str
    module: nn.Module | None = None
    skip_bias: bool = False
    merged_bias: torch.Tensor | None = None
    weight_abs: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda w: w.abs())
    cached_abs: bool = False
    mass: bool = True
    scratch: Any = None
    donated: bool = False


RuleFn = Callable[[Ctx, tuple, dict], Any]
"""A rule function: ``fn(ctx, args, kwargs) -> value``."""


@dataclass(frozen=True, eq=False)
class Rule:
    """An operation's split-pair rule with its metadata (see the module docstring).

    Calling the rule calls ``fn(ctx, args, kwargs)``.
    """

    fn: Callable[[Ctx, tuple, dict], Any]
    lrp: str = "epsilon"
    activation: bool = False
    relu: bool = False
    signs: tuple[int, int] | None = None
    query: bool = False
    freezes: Callable[[Any, set, Any], str | None] | None = None
    constant: bool = False
    mass_linear: bool = False
    exponent: Callable[[Any], int | None] | None = None
    merge: str | None = None
    refuses: Callable[[Any, Any], str | None] | None = None
    factors: tuple[tuple[int, str], ...] | None = None
    fresh: bool = False
    inplace: bool = False

    def __post_init__(self) -> None:
        if self.lrp not in LRP_KINDS:
            raise ValueError(f"lrp={self.lrp!r} is not one of {LRP_KINDS}")
        if self.merge not in (None, "affine", "batchnorm"):
            raise ValueError(f"merge={self.merge!r} is not None, 'affine' or 'batchnorm'")
        if (self.lrp == "sum") != (self.signs is not None):
            raise ValueError("a rule with lrp='sum' needs signs, and only such a rule")
        if self.factors is not None and self.lrp != "product":
            raise ValueError("factors are for a rule with lrp='product' only")

    def __call__(self, ctx: Ctx, args: tuple, kwargs: dict) -> Any:
        return self.fn(ctx, args, kwargs)

    @property
    def name(self) -> str:
        """The rule function's name."""
        return getattr(self.fn, "__name__", repr(self.fn))

    def factor_operands(self, node: Any) -> list[Any] | None:
        """The factors of a product at the graph node ``node`` (its arguments at the
        positions or keywords of ``factors``; None where ``factors`` is None: every operand
        is a factor)."""
        if self.factors is None:
            return None
        return [node.args[i] if i < len(node.args) else node.kwargs.get(key)
                for i, key in self.factors]

    @property
    def structural(self) -> bool:
        """Whether the operation moves values without mixing neurons (for any maxpool mode,
        ``"maxpool"`` rules excepted)."""
        return self.lrp in ("structural", "index")

    def __repr__(self) -> str:
        return f"Rule({self.name}, lrp={self.lrp!r}, activation={self.activation})"


@dataclass(frozen=True)
class FunctionName:
    """A function named by its qualified name (``module.qualname``), for functions of other
    packages that ``torch.fx`` keeps as calls (``torch.fx.wrap``) and that the rule table
    should know without importing their package (``torchvision.ops.stochastic_depth``)."""

    qualified: str

    @staticmethod
    def of(fn: Any) -> str:
        """The qualified name of a function (``""`` when it has none)."""
        module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""


class RuleTable:
    """The rules of leaf modules (by type), functions (by identity, else by qualified name:
    :class:`FunctionName`) and tensor methods (by name)."""

    def __init__(self) -> None:
        self.modules: list[tuple[type, Rule]] = []
        self.functions: dict[Any, Rule] = {}
        self.named: dict[str, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self._by_type: dict[type, Rule | None] = {}  # module() per class, emptied by add()

    def add(self, target: Any, rule: Rule) -> None:
        """Register ``rule`` for a module type, a function (or its :class:`FunctionName`) or
        a method name."""
        if isinstance(target, type) and issubclass(target, nn.Module):
            self.modules.append((target, rule))
            self._by_type.clear()
        elif isinstance(target, FunctionName):
            self.named[target.qualified] = rule
        elif isinstance(target, str):
            self.methods[target] = rule
        elif callable(target):
            self.functions[target] = rule
        else:
            raise TypeError(f"cannot register a rule for {target!r}")

    def module(self, module: nn.Module) -> Rule | None:
        """The rule of a leaf module (the first registered type it is an instance of)."""
        cls = type(module)
        try:
            return self._by_type[cls]
        except KeyError:
            pass
        found = next((rule for kind, rule in self.modules if issubclass(cls, kind)), None)
        self._by_type[cls] = found
        return found

    def function(self, fn: Any) -> Rule | None:
        """The rule of a ``call_function`` target."""
        try:
            rule = self.functions.get(fn)
        except TypeError:  # unhashable target
            return None
        if rule is None and self.named:
            rule = self.named.get(FunctionName.of(fn))
        return rule

    def method(self, name: str) -> Rule | None:
        """The rule of a ``call_method`` target."""
        return self.methods.get(name)

    def lookup(self, op: str, target: Any, module: nn.Module | None = None) -> Rule | None:
        """The rule of an fx node (``op``, ``target``), ``module`` for ``call_module``."""
        if op == "call_module":
            return self.module(module)
        if op == "call_method":
            return self.method(target)
        if op == "call_function":
            return self.function(target)
        return None


TABLE = RuleTable()


def register(*targets: Any, lrp: str = "epsilon", activation: bool = False, relu: bool = False,
             signs: tuple[int, int] | None = None, query: bool = False,
             freezes: Callable[[Any, set, Any], str | None] | None = None,
             constant: bool = False, mass_linear: bool = False,
             exponent: Callable[[Any], int | None] | None = None, merge: str | None = None,
             refuses: Callable[[Any, Any], str | None] | None = None,
             factors: tuple[tuple[int, str], ...] | None = None,
             fresh: bool = False, inplace: bool = False,
             ) -> Callable[[Callable], Rule]:
    """Decorator: make a rule function a :class:`Rule` and register it for ``targets``."""

    def wrap(fn: Callable[[Ctx, tuple, dict], Any]) -> Rule:
        rule = fn if isinstance(fn, Rule) else Rule(fn, lrp, activation, relu, signs, query,
                                                   freezes, constant, mass_linear, exponent,
                                                   merge, refuses, factors, fresh, inplace)
        for target in targets:
            TABLE.add(target, rule)
        return rule

    return wrap


def static_args(ctx: Ctx, values: Any, op: str) -> None:
    """Refuse an operation whose other arguments ``values`` hold an activation: it would
    combine two activations (a product or another non-linear combination)."""
    if contains_pair(values):
        raise unsupported(
            ctx,
            f"`{op}` of two activations (a product or other non-linear combination)",
            "Only products with constants are piecewise linear; products of activations "
            "(gating, attention, squeeze-excitation) cannot be split exactly.",
        )


def unsupported(ctx: Ctx, what: str, fix: str) -> UnsupportedOperation:
    """Build the error for an operation without an exact split rule."""
    return UnsupportedOperation(f"{ctx.where}: {what} has no exact split-pair rule. {fix}")
