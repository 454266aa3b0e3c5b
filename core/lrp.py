"""SplitLRP: epsilon-LRP on the split pair (paper section 4.2).

The positive and negative stream neurons are two sets of neurons of one model with
non-negative weights. Relevance is seeded at the positive stream's output ``a(L,+)`` and
redistributed layer by layer with the epsilon rule (eq. 9, gamma 0, signed epsilon)::

    R_j = a_j * sum_i w_ij * R_i / (z_i + eps * sign(z_i))

on every operation that mixes neurons (affine layers, BatchNorm -- merged into the preceding
affine layer when the split was built with ``merge_batchnorm=True`` --, average pooling,
convex max pooling). A sum of two activations (a residual add) gives each branch half of the
relevance of each stream (``residual="even"``, the default and the paper's choice), except
where one branch's value in that stream is exactly zero: that branch gets none of it and the
other all (a zero neuron could not pass relevance on; see :func:`_even`); or it applies the
epsilon rule to the sum, sharing relevance in proportion to the branches' contributions
(``residual="proportional"``). Structural operations (views, slicing, concatenation, padding,
winner-takes-all max pooling) move relevance without changing it. ReLU-type units pass it on
unchanged (``"pass"``, the paper: LRP ignores the activation functions) or, for ReLU, hand the
g stream's relevance to the winning pre-activation (``"wta"``). The forward stabiliser's
shifts pass relevance unchanged; the shifted split activations are the ``a_j`` of the rule
(``"scale"`` floors a lowered mass at the activation here, ``s <- max(theta^k s, |d|)``, so
that no part turns negative: docs/math.md section 3).
docs/math.md section 5 states the rules.

The rule of each node is applied through autograd on the node's own split rule: with the
output coefficients ``c = R / z`` sent back as gradients of ``(d, s)``, the vector-Jacobian
product is the rule's ``sum_i w_ij c_i`` in ``(a+, a-)`` coordinates, exact for every
operation the split supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from core import checks
from core.errors import SplitOverflowError, precision_advice
from core.interpreter import SplitInterpreter, Step
from core.pair import Pair

if TYPE_CHECKING:  # pragma: no cover
    from core.split import SplitModel

ACTIVATION_RULES = ("pass", "wta")
RESIDUAL_RULES = ("even", "proportional")
STREAMS = ("pos", "neg", "comb")


@dataclass(frozen=True)
class Relevance:
    """Relevance of the two streams at one node.

    Attributes
    ----------
    pos: torch.Tensor
        ``R(l,+)``, the relevance of the positive stream neurons.
    neg: torch.Tensor
        ``R(l,-)``, the relevance of the negative stream neurons.
    """

    pos: torch.Tensor
    neg: torch.Tensor

    @property
    def comb(self) -> torch.Tensor:
        """The combined map ``R(l,+) - R(l,-)`` (eq. 10)."""
        return self.pos - self.neg

    def stream(self, name: str) -> torch.Tensor:
        """``"pos"``, ``"neg"`` or ``"comb"``."""
        return getattr(self, checks.option("stream", name, STREAMS))


def _stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return z + epsilon * sign


def _kind(split: SplitModel, step: Step, activation_rule: str, residual: str,
          records: dict) -> str:
    """How relevance passes through a step, read off its rule's metadata."""
    rule = step.rule
    if rule.lrp == "sum" and isinstance(records.get(step.node), (tuple, list)):
        return "structural"  # two sequences concatenated (x.chunk(2, 1) + (z,))
    if rule.lrp == "sum" and residual == "even":
        pairs = [n for n in step.node.all_input_nodes if isinstance(records.get(n), Pair)]
        if len(pairs) > 1:
            return "even"
    if rule.lrp == "activation":
        return "relu-wta" if (activation_rule == "wta" and rule.relu) else "pass"
    if rule.lrp == "maxpool":
        return "structural" if split.maxpool == "wta" else "epsilon"
    if rule.structural:
        return "structural"
    if rule.lrp == "product":
        # a product of two activations: the epsilon rule through the four products hands
        # each factor the full relevance, so it is shared evenly (1/n for a ** n); where
        # the rule names its factors (addmm's mat1 and mat2), only they count
        operands = rule.factor_operands(step.node)
        if operands is None:
            operands = [v for a in step.node.args
                        for v in (a if isinstance(a, (list, tuple)) else [a])]
        pairs = sum(isinstance(records.get(v), Pair) for v in operands
                    if isinstance(v, fx.Node))
        return "product" if _exponent(step) is not None or pairs > 1 else "epsilon"
    return "epsilon"


def _element(step: Step, source: Any, value: Any) -> Any:
    """Where ``value`` sits in the tuple of pairs ``source`` when the step picks one element
    of it (``t[i]``, or a field such as ``x.max(1).values``); None for any other step."""
    if not isinstance(source, (tuple, list)):
        return None
    if step.rule.lrp == "index":
        return step.node.args[1]
    return next((i for i, v in enumerate(source) if v is value and isinstance(v, Pair)), None)


def _exponent(step: Step) -> int | None:
    """The exponent of an ``a ** n`` / ``a.square()`` step (None for other products)."""
    return None if step.rule.exponent is None else step.rule.exponent(step.node)


def relevance(
    split: SplitModel,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    seed: torch.Tensor,
    layers: Sequence[str] = (),
    epsilon: float = 1e-6,
    activation_rule: str = "pass",
    residual: str = "even",
    extra_args: tuple = (),
    kwargs: dict | None = None,
) -> dict[str, Relevance | tuple[Relevance, ...]]:
    """SplitLRP relevance at the input and at the requested layers.

    Parameters
    ----------
    split: SplitModel
        The split pair (its maxpool mode, stabiliser and BatchNorm merging apply).
    x: torch.Tensor or tuple of torch.Tensor
        The input batch; a tuple for a model called with several tensors
        (``model(x1, x2)``), each split and each with one row per sample.
    seed: torch.Tensor
        Relevance at the positive stream's output, shaped like the model's output (zennit's
        convention: the attributor's output gradient, e.g. a one-hot vector; pass
        ``onehot * g`` for the paper's total ``a(L,+)``).
    layers: str or sequence of str
        Further names to report, as for :meth:`SplitModel.sensitivities`: module names,
        ``"NAME:0"``... for the elements of a tuple output, ``"input:1"``... for one of
        several inputs.
    epsilon: float
        The epsilon of eq. 9 (signed).
    activation_rule: str
        ``"pass"`` or ``"wta"`` (see the module docstring).
    residual: str
        At a sum of two activations (a residual add): ``"even"`` gives each branch half of
        the relevance of each stream (the paper, section 4.2) where both branches' values in
        that stream are nonzero (or both zero), and all of it to the one branch whose value
        is nonzero where the other's is exactly zero (the zero branch could not pass its half
        on: a bias-free model kept as little as 81% of the seed); ``"proportional"`` shares
        it by the branches' contributions (the epsilon rule).
    extra_args, kwargs:
        Further positional and keyword arguments of the model's forward (not split).

    Returns
    -------
    dict of str to Relevance or tuple of Relevance
        ``"input"`` and every requested layer. With several inputs, ``"input"`` is a tuple
        of one :class:`Relevance` per input, in order (``"input:1"`` is its element 1);
        conservation then holds over the inputs together: their relevances summed equal the
        seed, less what biases and epsilon absorb. An input the output does not depend on
        gets zero relevance.

    Raises
    ------
    ValueError
        For a NaN or negative ``epsilon`` or a seed holding NaN or Inf (before the forward
        pass), for an output without one row per input row (a forward that mixes the batch:
        :func:`core.checks.output_rows`) or a seed not shaped like the output, before any
        relevance is propagated; for several inputs that do not all have as many rows as
        the first (an input shared by the batch would collect the relevance of every row),
        and for the bare name of a module whose output the capture holds as a tuple (name
        its elements).
    """
    checks.option("activation_rule", activation_rule, ACTIVATION_RULES)
    checks.option("residual", residual, RESIDUAL_RULES)
    checks.number("epsilon", epsilon, 0.0)
    if isinstance(seed, torch.Tensor):
        checks.finite("seed", seed, fix="pass a finite seed (a one-hot vector, the logits)")
    call = split.prepare(x, extra_args, kwargs, backward=True)
    interp = call.interpreter
    rows = call.inputs[0].shape[0]
    for i, t in enumerate(call.inputs[1:], 1):
        if t.shape[0] != rows:
            raise ValueError(
                f"SplitLRP: input {i} has {t.shape[0]} rows and input 0 has {rows}; relevance "
                f"is per row, so every input needs one row per sample (expand an input "
                f"shared by the batch to {rows} rows)")
    wanted = {"input": call.node_of("input")}
    if isinstance(layers, str):  # one name (was read as its characters)
        layers = [layers]
    wanted.update({layer: call.node_of(layer) for layer in layers})
    for name, node in wanted.items():
        if isinstance(node, tuple) and name not in checks.INPUT_NAMES:
            raise checks.tuple_output(name, [f"{name}:{i}" for i in range(len(node))],
                                      len(node))
    with torch.no_grad():
        out, records = split.run(call, split.input_pairs(call.inputs), record_all=True,
                                 keep_parts=True)
    checks.output_rows(out.d, rows)
    call.check_values({k: v for k, v in wanted.items() if k not in checks.INPUT_NAMES},
                      records)
    if not isinstance(seed, torch.Tensor) or seed.shape != out.d.shape:
        got = tuple(seed.shape) if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise ValueError(f"seed must be a tensor shaped like the output {tuple(out.d.shape)}, "
                         f"got {got}")
    seed = seed.to(dtype=out.d.dtype, device=out.d.device)
    steps = list(interp.steps.values())
    output_node = interp.output_node.args[0]
    rel: dict[fx.Node, Any] = {output_node: (seed, torch.zeros_like(seed))}
    found: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    by_node = interp.steps
    merged_into: dict[fx.Node, fx.Node] = {}  # affine node -> BatchNorm node merged into it
    for step in steps:
        if step.merged:
            merged_into[step.node.args[0]] = step.node
    targets = {n for node in wanted.values()
               for n in (node if isinstance(node, tuple) else (node,))}
    targets |= {merged_into[n] for n in targets if n in merged_into}
    def check_finite(node: fx.Node, r: Any) -> None:
        if not isinstance(r, dict) and not (torch.isfinite(r[0]).all()
                                            and torch.isfinite(r[1]).all()):
            where = call.describe(node)
            raise SplitOverflowError(
                f"SplitLRP relevance overflowed {seed.dtype} at "
                f"{f'the input ({where})' if node.op == 'placeholder' else where} (counting "
                "from the output): the relevance ratios of eq. 9 grow past the float range "
                f"(or divide 0 by 0 at epsilon={epsilon:g}). "
                + precision_advice(seed.dtype, "a larger epsilon")
            )

    for step in reversed(steps):
        node = step.node
        if node not in rel or node.op in ("output", "placeholder", "get_attr"):
            continue
        r = rel.pop(node)
        check_finite(node, r)
        if node in targets:
            found[node] = r
        if step.rule is None or not isinstance(records.get(node), (Pair, tuple, list)):
            continue
        source = node.args[0] if node.args else None
        index = _element(step, records.get(source), records[node])
        if index is not None:
            parts = rel.setdefault(source, {})  # relevance of one element of a tuple of pairs
            parts[index] = r if index not in parts else (parts[index][0] + r[0],
                                                         parts[index][1] + r[1])
            continue
        if node in merged_into.values():
            src = by_node[node.args[0]]
            _propagate(interp, [src, step], r, records, rel, epsilon, "epsilon")
        else:
            _propagate(interp, [step], r, records, rel, epsilon,
                       _kind(split, step, activation_rule, residual, records))
    for node in targets:
        if node in merged_into and merged_into[node] in found:
            found[node] = found[merged_into[node]]  # conv + BatchNorm is one layer here
        elif node not in found and node in rel:
            check_finite(node, rel[node])  # the input's relevance: no step pops it
            found[node] = rel[node]

    def at(node: fx.Node) -> Relevance:
        if node in found:
            return Relevance(*found[node])
        like = records[node].d  # no relevance reaches it (it does not enter the output)
        return Relevance(torch.zeros_like(like), torch.zeros_like(like))

    return {name: tuple(at(n) for n in node) if isinstance(node, tuple) else at(node)
            for name, node in wanted.items()}


def _args_with(node: fx.Node, records: dict, variables: dict,
               factors: tuple[tuple[int, str], ...] | None = None,
               others: dict | None = None) -> tuple[tuple, dict]:
    """The node's arguments with its input nodes replaced by ``variables``; with
    ``factors`` (positions and keywords), the arguments elsewhere take ``others`` instead
    (own leaves, so that their relevance is told apart from the factors')."""
    def mapper(table: dict) -> Any:
        return lambda n: table.get(n, records.get(n))

    if factors is None or others is None:
        value = mapper(variables)
        return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    positions, keys = {i for i, _ in factors}, {k for _, k in factors}
    args = tuple(fx.node.map_arg(a, mapper(variables if i in positions else others))
                 for i, a in enumerate(node.args))
    kwargs = {k: fx.node.map_arg(v, mapper(variables if k in keys else others))
              for k, v in node.kwargs.items()}
    return args, kwargs


def _propagate(interp: SplitInterpreter, chain: list[Step], r, records, rel, epsilon,
               kind) -> None:
    """Send the relevance ``r`` of the last step of ``chain`` to the first step's inputs.

    The vector-Jacobian products are taken per stream (the coefficients of ``z+`` and of
    ``z-`` separately), so that a tiny relevance of one stream is not lost to rounding next
    to a large one of the other.
    """
    first = chain[0]
    inputs = [n for n in first.node.all_input_nodes if _pairs(records.get(n))]
    if kind in ("pass", "relu-wta"):
        src = first.node.args[0]
        rp, rn = r
        if kind == "relu-wta":
            winner = records[src].d >= 0
            rn = rn + torch.where(winner, 0.0, rp)
            rp = torch.where(winner, rp, 0.0)
        _add(rel, src, (rp, rn))
        return
    if kind == "even":
        _even(first, r, records, rel)
        return
    # a product's factors share the relevance (1/n each); where the rule names its factors
    # (addmm), the other operands (the added input) have their own leaves and keep theirs
    share = 1 / (_exponent(first) or 2) if kind == "product" else 1.0
    factors = first.rule.factors if kind == "product" else None
    with torch.enable_grad():
        variables = {n: _variable(records[n]) for n in inputs}
        others = None if factors is None else {n: _variable(records[n]) for n in inputs}
        args, kwargs = _args_with(first.node, records, variables, factors, others)
        out = interp.run_rule(first, args, kwargs)
        for later in chain[1:]:
            rest = tuple(later.node.args[1:])
            out = interp.run_rule(later, (out,) + rest, dict(later.node.kwargs))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        rs = r if isinstance(r, dict) else {0: r}
        tensors, coef_pos, coef_neg = [], [], []
        for i, o in enumerate(outs):
            if i not in rs:
                continue
            cp, cn = rs[i]
            if kind in ("epsilon", "product"):
                cp = cp / _stabilised(o.pos.detach(), epsilon)
                cn = cn / _stabilised(o.neg.detach(), epsilon)
            tensors += [o.d, o.s]
            coef_pos += [cp / 2, cp / 2]  # z+ = (s + d) / 2
            coef_neg += [-cn / 2, cn / 2]  # z- = (s - d) / 2
        # (input node, element index or None, its pair, its leaves, its share) for every
        # pair that enters the step
        entering = [(n, i, p, variables[n], share) for n in inputs for i, p in _pairs(records[n])]
        if others is not None:
            entering += [(n, i, p, others[n], 1.0) for n in inputs
                         for i, p in _pairs(records[n])]
        leaves = [v if i is None else v[i] for _, i, _, v, _ in entering]
        wrt = [t for leaf in leaves for t in (leaf.d, leaf.s)]
        from_pos = torch.autograd.grad(tensors, wrt, coef_pos, retain_graph=True,
                                       allow_unused=True)
        from_neg = torch.autograd.grad(tensors, wrt, coef_neg, allow_unused=True)
    for k, (n, i, pair, _, part) in enumerate(entering):
        jp = jn = None
        for got in (from_pos, from_neg):
            gd = _zero_if_none(got[2 * k], pair.d)
            gs = _zero_if_none(got[2 * k + 1], pair.s)
            # d = a+ - a-, s = a+ + a-: d/da+ = gd + gs, d/da- = gs - gd
            jp = gd + gs if jp is None else jp + (gd + gs)
            jn = gs - gd if jn is None else jn + (gs - gd)
        if kind in ("epsilon", "product"):
            jp, jn = pair.pos * jp, pair.neg * jn
        if part != 1.0:
            jp, jn = jp * part, jn * part
        _add(rel, n, (jp, jn) if i is None else {i: (jp, jn)})


def _pairs(value: Any) -> list[tuple[int | None, Pair]]:
    """The pairs of a node's value: ``[(None, pair)]`` for a pair, ``[(i, pair), ...]`` for
    the pair elements of a tuple (``x.chunk(2, 1)``), else empty."""
    if isinstance(value, Pair):
        return [(None, value)]
    if isinstance(value, (tuple, list)):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, Pair)]
    return []


def _variable(value: Any) -> Any:
    """A node's value with its pairs as fresh leaves that require gradients."""
    if isinstance(value, Pair):
        return Pair(value.d.detach().requires_grad_(True), value.s.detach().requires_grad_(True))
    return type(value)(_variable(v) if isinstance(v, Pair) else v for v in value)


def _zero_if_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t


def _even(step, r, records, rel) -> None:
    """A sum of two activations ``c = a + alpha b`` (``a - b``, ``b - a``): the relevance of
    each stream of ``c`` is shared evenly among the branches that carry that stream there.

    A branch added with a positive coefficient carries ``c+`` with its ``a+`` and ``c-``
    with its ``a-``; one added with a negative coefficient swaps them (``a - b`` adds ``b-``
    to ``c+``). Per element and stream, with ``v_a`` and ``v_b`` the stream values the two
    branches contribute (their ``a+`` or ``a-``, a zero ``alpha`` making ``v_b`` zero)::

        R_a = R_c / 2,  R_b = R_c / 2     where v_a != 0 and v_b != 0 (the paper),
                                          or v_a == 0 and v_b == 0;
        R_a = R_c,      R_b = 0           where v_a != 0 and v_b == 0 (and the mirror case).

    A branch whose stream value is exactly zero there contributes nothing to that stream, and
    the layer below it could not pass relevance on (eq. 9 gives ``a_j = 0`` neurons nothing):
    half of ``R_c`` would be lost to conservation.
    """
    node = step.node
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    positive = alpha >= 0
    # alpha multiplies the subtracted operand of a - b and b - a, the second one of a + b
    signs = list(step.rule.signs)
    scaled = signs.index(-1) if -1 in signs else 1
    signs[scaled] *= 1 if positive else -1
    signs = [sign > 0 for sign in signs]  # is each operand added with a positive coefficient?
    srcs = list(node.args[:2])
    # carries[k][t]: is branch k's value nonzero in the stream that takes c's stream t
    # (t = 0: c+, t = 1: c-)?
    carries = []
    for k, (src, plus) in enumerate(zip(srcs, signs, strict=True)):
        pair = records[src]
        pos, neg = pair.pos != 0, pair.neg != 0
        if k == scaled and alpha == 0:
            pos, neg = torch.zeros_like(pos), torch.zeros_like(neg)
        carries.append((pos, neg) if plus else (neg, pos))
    for k, (src, plus) in enumerate(zip(srcs, signs, strict=True)):
        mine, other = carries[k], carries[1 - k]
        shares = []
        for t, rt in enumerate(r):
            half = rt / 2
            # all of it where only this branch carries the stream, none where only the other
            # does, half elsewhere (bit for bit the paper's rule where both carry it)
            share = torch.where(mine[t] & ~other[t], rt, torch.where(other[t] & ~mine[t],
                                                                     torch.zeros_like(rt), half))
            shares.append(share)
        rp, rn = shares
        _add(rel, src, (rp, rn) if plus else (rn, rp))


def _add(rel: dict, node: fx.Node, r) -> None:
    """Add relevance ``r`` (a pair of maps, or ``{element: pair of maps}`` for a tuple)."""
    old = rel.get(node)
    if old is None:
        rel[node] = dict(r) if isinstance(r, dict) else r
    elif isinstance(r, dict):
        for i, part in r.items():
            old[i] = part if i not in old else (old[i][0] + part[0], old[i][1] + part[1])
    else:
        rel[node] = (old[0] + r[0], old[1] + r[1])
