"""The split pair of a model: ``core.split(model)`` and :class:`SplitModel`."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core import rules
from core.errors import SplitOverflowError, UnsupportedOperation
from core.graph import trace
from core.pair import Pair, contains_pair
from core.probes import Probe
from core.stabilize import ScaleGrad, stabilise

MAXPOOL_MODES = ("convex", "wta")
STABILIZERS = ("scale", "shift", "none")
INPUT_SPLITS = ("relu", "half")
NONLINEAR_MODES = ("error", "freeze")
_AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Step:
    node: fx.Node
    rule: rules.Rule | None  # None: evaluated as the model's own (static) operation
    carries: bool  # produces split pairs
    activation: bool  # a ReLU-type unit: stabiliser and alpha shift apply after it
    shift_name: str | None
    module: nn.Module | None
    where: str
    skip_bias: bool = False
    merged_bias: torch.Tensor | None = None
    merged: bool = False  # a BatchNorm merged into the affine layer before it
    free: tuple[str, ...] = ()
    frozen: str | None = None  # what nonlinear="freeze" freezes here


def _option(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


class SplitModel:
    """A trained piecewise-linear model as its split pair ``(g, h)`` with ``g - h = f``.

    A view of the model: no weight is copied and the model is never modified. Build it with
    :func:`core.split`.

    Parameters
    ----------
    model: torch.nn.Module
        The model ``f``.
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
        Scaling factor of the ``"scale"`` stabiliser (the paper's minimise factor).
    threshold: float
        The threshold ``Theta`` of the stabilisers.
    cache_abs_weights: bool
        Keep ``|W|`` of every affine layer between calls (more memory, less time); the cache
        is refreshed when a parameter changes.
    nonlinear: str
        What to do with operations that are not piecewise linear (SiLU, GELU, sigmoid and
        softmax gates, attention, LayerNorm/GroupNorm/RMSNorm, division by an activation):
        ``"error"`` (default) raises :class:`core.UnsupportedOperation`; ``"freeze"`` splits
        them with their data-dependent factor frozen at the model's activation (see
        :mod:`core.frozen`), warns and lists them in :meth:`frozen_operations`. ``g - h``
        stays exact; the sensitivities are those of the frozen model. Products of
        activations are split exactly in both modes (:mod:`core.products`).
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
        nonlinear: str = "error",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.maxpool = _option("maxpool", maxpool, MAXPOOL_MODES)
        self.stabilizer = _option("stabilizer", stabilizer, STABILIZERS)
        self.input_split = _option("input_split", input_split, INPUT_SPLITS)
        self.nonlinear = _option("nonlinear", nonlinear, NONLINEAR_MODES)
        if not 0 < theta <= 1:
            raise ValueError(f"theta={theta} must be in (0, 1]")
        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0")
        self.merge_batchnorm = bool(merge_batchnorm)
        self.theta, self.threshold = float(theta), float(threshold)
        self._abs_cache: dict[int, tuple[int, int, torch.Tensor]] | None = (
            {} if cache_abs_weights else None
        )
        self._warned_hooks = False
        self._traced = trace(model)
        self._steps = self._plan()
        self._step_of = {s.node: s for s in self._steps}
        self._frozen_after = self._frozen_downstream()
        if self.frozen_operations():
            listed = self.frozen_operations()
            more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
            warnings.warn(
                f"core.split froze {len(listed)} non-piecewise-linear operation(s) of "
                f"{type(model).__name__} at the model's activations (nonlinear='freeze'): "
                f"{'; '.join(listed[:5])}{more}. g - h equals the model's output exactly; the "
                "sensitivities are those of the frozen model (see sm.frozen_operations()).",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ planning
    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.model.get_submodule(node.target)
            return f"module {node.target!r} ({type(mod).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"graph node {node.name!r} ({node.op} {target})"

    def _plan(self) -> list[_Step]:
        nodes = self._traced.nodes
        placeholders = [n for n in nodes if n.op == "placeholder"]
        carries: set[fx.Node] = {placeholders[0]}
        steps: list[_Step] = []
        for node in nodes:
            inputs = node.all_input_nodes
            carry = node in carries or any(i in carries for i in inputs)
            module = self.model.get_submodule(node.target) if node.op == "call_module" else None
            rule: rules.Rule | None = None
            if node.op in ("placeholder", "output", "get_attr"):
                carry = node is placeholders[0] or (node.op == "output" and carry)
            elif carry:
                if node.op == "call_module":
                    rule = rules.module_rule(module)
                    fix = (
                        "Replace it by a supported piecewise-linear module (ReLU, ReLU6, "
                        "LeakyReLU, Hardtanh, MaxPool, AvgPool, Conv, Linear, BatchNorm, ...)"
                    )
                elif node.op == "call_method":
                    if node.target in rules.QUERY_METHODS:
                        carry = False
                    rule = rules.METHOD_RULES.get(node.target)
                    fix = "Express it with supported tensor operations."
                else:
                    if node.target is builtins.getattr and node.args[1] in rules.QUERY_ATTRIBUTES:
                        carry = False
                    rule = rules.FUNCTION_RULES.get(node.target)
                    fix = "Express it with supported tensor operations."
                if carry and rule is None:
                    what = (
                        type(module).__name__ if module is not None
                        else getattr(node.target, "__name__", str(node.target))
                    )
                    raise UnsupportedOperation(
                        f"{self._where(node)}: {what} is not piecewise linear or has no "
                        f"split-pair rule. {fix}"
                    )
            frozen = None
            if carry and rule is not None:
                frozen = rules.freezes(rule, node, carries)
                if frozen is not None and self.nonlinear == "error":
                    raise UnsupportedOperation(
                        f"{self._where(node)} is not piecewise linear: it has no exact "
                        f"split-pair rule. core.split(model, nonlinear='freeze') splits it "
                        f"with its data-dependent factor frozen at the model's activation "
                        f"({frozen}); g - h stays exact, the sensitivities are those of the "
                        "frozen model."
                    )
            if carry and isinstance(module, _BN_TYPES) and module.running_mean is None:
                raise UnsupportedOperation(
                    f"{self._where(node)}: batch normalisation without running statistics "
                    "uses batch statistics, which couple the rows of a batch and are not "
                    "piecewise linear; use track_running_stats=True (a trained model)."
                )
            if carry and not (rule is not None and rules.constant_result(rule)):
                carries.add(node)
            activation = rule is not None and rules.is_activation(rule)
            shift_name = None
            if activation:
                shift_name = node.target if node.op == "call_module" else node.name
            steps.append(_Step(node, rule, carry, activation, shift_name, module,
                               self._where(node) if node.op != "output" else "output",
                               frozen=frozen))
        if self.merge_batchnorm:
            self._plan_merges(steps)
        # free environment entries after their last use
        last_use: dict[str, int] = {}
        for i, step in enumerate(steps):
            for inp in step.node.all_input_nodes:
                last_use[inp.name] = i
        frees: dict[int, list[str]] = {}
        for name, i in last_use.items():
            frees.setdefault(i, []).append(name)
        for i, step in enumerate(steps):
            step.free = tuple(frees.get(i, ()))
        return steps

    def _plan_merges(self, steps: list[_Step]) -> None:
        by_node = {s.node: s for s in steps}
        for step in steps:
            if not isinstance(step.module, _BN_TYPES):
                continue
            src = step.node.args[0]
            prev = by_node.get(src)
            if (
                prev is not None and isinstance(prev.module, _AFFINE_TYPES)
                and len(src.users) == 1
            ):
                prev.skip_bias = True
                step.merged = True
                step.merged_bias = prev.module.bias

    def _frozen_downstream(self) -> dict[fx.Node, tuple[str, ...]]:
        """For every node, the frozen operations on a path from it to the output."""
        found: dict[fx.Node, set[str]] = {}
        for step in reversed(self._steps):
            here: set[str] = set()
            for user in step.node.users:
                here |= found.get(user, set())
                user_step = self._step_of.get(user)
                if user_step is not None and user_step.frozen is not None:
                    here.add(self._frozen_name(user_step))
            found[step.node] = here
        order = {self._frozen_name(s): i for i, s in enumerate(self._steps) if s.frozen}
        return {n: tuple(sorted(v, key=order.get)) for n, v in found.items()}

    @staticmethod
    def _frozen_name(step: _Step) -> str:
        return f"{step.where}: {step.frozen}"

    def frozen_operations(self) -> list[str]:
        """The operations that ``nonlinear="freeze"`` froze, in graph order, each with what
        is frozen (empty: the split is exact everywhere)."""
        return [self._frozen_name(s) for s in self._steps if s.frozen is not None]

    # ------------------------------------------------------------------ names
    def layer_names(self) -> list[str]:
        """Names that :meth:`sensitivities` accepts (module names, ``"input"``)."""
        names = [n for n in self._traced.module_outputs if n != ""]
        return names + [f"{n}:input" for n in self._traced.module_inputs]

    def shift_points(self) -> list[str]:
        """Names of the alpha-shift points: ``"input"``, ReLU-type units, ``"output"``."""
        names = ["input"]
        for step in self._steps:
            if step.activation and step.shift_name not in names:
                names.append(step.shift_name)
        return names + ["output"]

    def _node_of(self, layer: str) -> fx.Node:
        traced = self._traced
        if layer.endswith(":input"):
            base = layer[: -len(":input")]
            if base in traced.module_inputs:
                return traced.module_inputs[base]
        elif layer in traced.module_outputs:
            return traced.module_outputs[layer]
        known = [n for n, _ in self.model.named_modules()]
        if layer in known or layer.removesuffix(":input") in known:
            raise ValueError(
                f"layer {layer!r} is a module of the model but is never called in its forward"
            )
        import difflib

        close = difflib.get_close_matches(layer.removesuffix(":input"), known, n=5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"layer {layer!r} is not a module of {type(self.model).__name__}; use a name from "
            f"model.named_modules() or 'input' (optionally with ':input').{hint}"
        )

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

    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating point tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("input must have a batch dimension, got a scalar")
        if x.shape[0] == 0:
            raise ValueError(f"input has an empty batch (shape {tuple(x.shape)}); pass at "
                             "least one sample")
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf values; clean or clip it first")
        hooked = [name for name, m in self.model.named_modules()
                  if name and (m._forward_hooks or m._forward_pre_hooks)]
        if hooked and not self._warned_hooks:
            self._warned_hooks = True
            warnings.warn(
                f"modules {hooked[:5]} of {type(self.model).__name__} have forward hooks; the "
                "split evaluates the traced graph and does not run module hooks, so a hook "
                "that changes outputs is not reflected in g - h.",
                stacklevel=3,
            )
        if self.model.training:
            warnings.warn(
                f"{type(self.model).__name__} is in training mode: the split uses eval "
                "semantics (BatchNorm running statistics, dropout off) and does not change the "
                "mode; call model.eval() to compare with model(x).",
                stacklevel=3,
            )
        return x

    def _run(
        self,
        d_in: torch.Tensor,
        s_in: torch.Tensor,
        extra_args: tuple,
        *,
        factors: Mapping[str, float] | None = None,
        record: Iterable[fx.Node] = (),
        record_all: bool = False,
    ) -> tuple[Pair, dict[fx.Node, Pair]]:
        record = set(record)
        records: dict[fx.Node, Pair] = {}
        env: dict[str, Any] = {}
        extra = list(extra_args)
        first = True
        for step in self._steps:
            node = step.node
            if node.op == "placeholder":
                if first:
                    first = False
                    value = Pair(d_in, s_in)
                    if node in record or record_all:
                        records[node] = value
                    f = 1.0 if factors is None else factors.get("input", 1.0)
                    if factors is not None and f != 1.0:
                        value = Pair(d_in, ScaleGrad.apply(s_in, f))
                elif extra:
                    value = extra.pop(0)
                elif node.args:
                    value = node.args[0]  # default value of the forward's argument
                else:
                    raise TypeError(f"the model's forward needs the argument {node.target!r}; "
                                    "pass it in extra_args")
                if record_all:
                    records.setdefault(node, value)
                env[node.name] = value
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n.name])
                break
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "get_attr":
                value = _fetch_attr(self.model, node.target)
            elif step.rule is None or not contains_pair((args, kwargs)):
                value = _static_eval(self.model, node, step, args, kwargs)
            else:
                ctx = rules.Ctx(self.maxpool, step.where, step.module, step.skip_bias,
                                step.merged_bias, self._weight_abs,
                                self._abs_cache is not None)
                try:
                    value = step.rule(ctx, args, kwargs)
                except (UnsupportedOperation, SplitOverflowError):
                    raise
                except Exception as err:
                    raise type(err)(f"{step.where}: {err}") from err
                if step.activation:
                    value = Pair(value.d, stabilise(value.d, value.s, self.stabilizer,
                                                    self.theta, self.threshold))
            if node in record or record_all:
                records[node] = value
            if step.activation and factors is not None:
                f = factors.get(step.shift_name, 1.0)
                if f != 1.0:
                    value = Pair(value.d, ScaleGrad.apply(value.s, f))
            env[node.name] = value
            for name in step.free:
                env.pop(name, None)
        if isinstance(out, torch.Tensor):
            raise UnsupportedOperation(
                f"the output of {type(self.model).__name__} does not depend on its input "
                "through the split: every path to it passes an operation frozen to a constant "
                f"({'; '.join(self.frozen_operations()[-3:])}). Split the model without its "
                "final gate (e.g. the logits before a softmax)."
            )
        if not isinstance(out, Pair):
            raise UnsupportedOperation(
                f"{type(self.model).__name__} returns {type(out).__name__}; the split needs a "
                "single output tensor. Wrap the model so that it returns one tensor."
            )
        return out, records

    def _initial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_in = x.detach()
        s_in = d_in.abs() if self.input_split == "relu" else torch.zeros_like(d_in)
        return d_in, s_in

    def _first_overflow(self, x: torch.Tensor, extra_args: tuple) -> str:
        with torch.no_grad():
            _, records = self._run(*self._initial(x), extra_args, record_all=True)
        for node, pair in records.items():
            if isinstance(pair, Pair) and not torch.isfinite(pair.s).all():
                return self._describe(node)
        return "the output"

    def _first_backward_overflow(self, x: torch.Tensor, index: torch.Tensor,
                                 factors: Mapping[str, float], extra_args: tuple) -> str:
        """Rerun the backward and name the node nearest the output where S is not finite."""
        first: list[fx.Node] = []
        with torch.enable_grad():
            d_in, s_in = self._initial(x)
            d_in = d_in.requires_grad_(True)
            s_in = s_in.clone().requires_grad_(True)
            out, records = self._run(d_in, s_in, extra_args, factors=factors, record_all=True)
            for node, pair in records.items():
                if isinstance(pair, Pair) and pair.s.requires_grad:
                    def hook(grad: torch.Tensor, node: fx.Node = node) -> None:
                        if grad is not None and not first and not grad.isfinite().all():
                            first.append(node)
                    pair.s.register_hook(hook)
            seed = out.s.gather(1, index).sum() * 0.5 * factors["output"]
            torch.autograd.grad(seed + 0.5 * out.d.gather(1, index).sum(), [d_in, s_in],
                                allow_unused=True)
        return self._describe(first[0]) if first else "the output"

    def _describe(self, node: fx.Node) -> str:
        names = [k for k, v in self._traced.module_outputs.items() if v is node and k]
        return repr(names[0]) if names else f"graph node {node.name!r}"

    def forward_pairs(self, x: torch.Tensor, *extra_args: Any) -> Pair:
        """The output split pair in sum/difference form (no gradient)."""
        x = self._check_input(x)
        with torch.no_grad():
            out, _ = self._run(*self._initial(x), extra_args)
        if not torch.isfinite(out.s).all():
            raise SplitOverflowError(
                f"the split stream mass overflowed {x.dtype} at "
                f"{self._first_overflow(x, extra_args)} (stabilizer={self.stabilizer!r}); use "
                "stabilizer='scale' or float64 inputs"
            )
        return out

    def __call__(self, x: torch.Tensor, *extra_args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of the two split streams.

        Parameters
        ----------
        x: torch.Tensor
            The model's input.
        *extra_args
            Further positional arguments of the model's forward (passed as they are).

        Returns
        -------
        tuple of torch.Tensor
            ``(g, h)`` with ``g - h == model(x)`` up to float rounding of the streams.
        """
        out = self.forward_pairs(x, *extra_args)
        return out.pos, out.neg

    def streams(self, x_pos: torch.Tensor, x_neg: torch.Tensor,
                *extra_args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The split streams on an explicit input split ``x = x_pos - x_neg`` (Theorem 1).

        Differentiable in both arguments: with ``stabilizer="none"`` and convex max pooling,
        ``g`` and ``h`` are monotone and convex functions of ``(x_pos, x_neg)``.

        Parameters
        ----------
        x_pos, x_neg: torch.Tensor
            The two input streams (any values; their difference is the model's input).

        Returns
        -------
        tuple of torch.Tensor
            ``(g, h)`` at the output.
        """
        self._check_input(x_pos - x_neg)
        d_in = x_pos - x_neg
        s_in = x_pos + x_neg
        out, _ = self._run(d_in, s_in, extra_args)
        return out.pos, out.neg

    def pairs(self, x: torch.Tensor, layers: Sequence[str], *extra_args: Any) -> dict[str, Pair]:
        """Split pairs (``.pos``, ``.neg``, ``.d``, ``.s``) at the given layers (no gradient)."""
        x = self._check_input(x)
        nodes = {layer: self._node_of(layer) for layer in layers}
        with torch.no_grad():
            _, records = self._run(*self._initial(x), extra_args, record=nodes.values())
        return {layer: records[node] for layer, node in nodes.items()}

    # ------------------------------------------------------------------ sensitivities
    def _factors(self, alpha: float | Mapping[str, float]) -> dict[str, float]:
        points = self.shift_points()
        if isinstance(alpha, Mapping):
            unknown = sorted(set(alpha) - set(points) - {"default"})
            if unknown:
                raise ValueError(
                    f"alpha names unknown shift points {unknown}; shift points are 'input', "
                    f"'output', 'default' and the ReLU-type units {points[1:-1][:8]}..."
                )
            default = float(alpha.get("default", 0.4))
            values = {p: float(alpha.get(p, default)) for p in points}
        else:
            values = dict.fromkeys(points, float(alpha))
        for point, a in values.items():
            if not 0.0 <= a <= 0.5:
                raise ValueError(f"alpha={a} at {point!r} must be in [0, 0.5]")
        return {p: 1.0 - 2.0 * a for p, a in values.items()}

    def sensitivities(
        self,
        x: torch.Tensor,
        target: int | torch.Tensor,
        layers: Sequence[str] = ("input",),
        alpha: float | Mapping[str, float] = 0.4,
        extra_args: tuple = (),
    ) -> dict[str, Probe]:
        """Split activations and shifted local sensitivities at the given layers.

        Parameters
        ----------
        x: torch.Tensor
            The input batch.
        target: int or torch.Tensor
            The class index, or a 1-D tensor with one index per row.
        layers: sequence of str
            Names from ``model.named_modules()`` (the module's output; containers allowed),
            ``"input"`` (or ``""``), or ``"NAME:input"`` for a module's input.
        alpha: float or mapping
            The backward shift ``S <- (1 - 2 alpha) S`` at the input, after every ReLU-type
            unit and at the output; a mapping from shift-point names (see
            :meth:`shift_points`, plus ``"default"``) overrides it per point.
        extra_args: tuple
            Further positional arguments of the model's forward.

        Returns
        -------
        dict of str to Probe
            One :class:`core.Probe` per requested layer.
        """
        x = self._check_input(x)
        if isinstance(layers, str):
            layers = [layers]
        nodes = {layer: self._node_of(layer) for layer in layers}
        factors = self._factors(alpha)
        with torch.enable_grad():
            d_in, s_in = self._initial(x)
            d_in = d_in.requires_grad_(True)
            s_in = s_in.clone().requires_grad_(True)
            out, records = self._run(d_in, s_in, tuple(extra_args), factors=factors,
                                     record=nodes.values())
            if not torch.isfinite(out.s).all():
                raise SplitOverflowError(
                    f"the split stream mass overflowed {x.dtype} at "
                    f"{self._first_overflow(x, tuple(extra_args))} "
                    f"(stabilizer={self.stabilizer!r}); use stabilizer='scale' or float64 inputs"
                )
            index = _targets(target, out.d)
            sel_d = out.d.gather(1, index).sum()
            sel_s = out.s.gather(1, index).sum()
            unique = list(dict.fromkeys(nodes.values()))
            ds = [records[n].d for n in unique]
            ss = [records[n].s for n in unique]
            grads = torch.autograd.grad(sel_d, ds, retain_graph=True, allow_unused=True)
            half = torch.tensor(0.5, dtype=out.d.dtype, device=out.d.device)
            both = torch.autograd.grad(
                [sel_d, sel_s], ds + ss, grad_outputs=[half, half * factors["output"]],
                allow_unused=True,
            )
        result: dict[str, Probe] = {}
        for i, node in enumerate(unique):
            d, s = records[node].d.detach(), records[node].s.detach()
            probe = Probe(
                activation=d, mass=s,
                S=_or_zero(both[len(unique) + i], s) * 2,
                Dg=_or_zero(both[i], d) * 2,
                grad=_or_zero(grads[i], d),
                frozen=self._frozen_after.get(node, ()),
            )
            if not (torch.isfinite(probe.S).all() and torch.isfinite(probe.Dg).all()):
                where = self._first_backward_overflow(x, index, factors, tuple(extra_args))
                raise SplitOverflowError(
                    f"the sensitivities at {self._describe(node)} overflowed {x.dtype} at "
                    f"alpha={alpha} (first at {where}, counting from the output): the S stream "
                    "grows like the product of |W| over the layers above. Use a larger alpha "
                    "(closer to 0.5) or float64 (model.double() on a copy and x.double())."
                )
            for layer, n in nodes.items():
                if n is node:
                    result[layer] = probe
        return result


    def relevance(
        self,
        x: torch.Tensor,
        seed: torch.Tensor,
        layers: Sequence[str] = (),
        epsilon: float = 1e-6,
        activation_rule: str = "pass",
        residual: str = "even",
        extra_args: tuple = (),
    ) -> dict[str, Any]:
        """SplitLRP relevance (epsilon-LRP on the split pair); see :func:`core.lrp.relevance`.

        Returns
        -------
        dict of str to core.lrp.Relevance
            ``"input"`` and each requested layer, with ``.pos``, ``.neg`` and ``.comb``.
        """
        from core.lrp import relevance

        return relevance(self, x, seed, layers=layers, epsilon=epsilon,
                         activation_rule=activation_rule, residual=residual,
                         extra_args=extra_args)


def _or_zero(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t.detach()


def _targets(target: int | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if out.dim() != 2:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}; sensitivities need (batch, classes)"
        )
    n, k = out.shape
    if isinstance(target, (int,)) and not isinstance(target, bool):
        index = torch.full((n,), int(target), dtype=torch.long, device=out.device)
    elif isinstance(target, torch.Tensor) and not target.is_floating_point():
        index = target.to(device=out.device, dtype=torch.long).reshape(-1)
        if index.numel() == 1:
            index = index.expand(n)
        if index.numel() != n:
            raise ValueError(f"target has {index.numel()} entries for a batch of {n}")
    else:
        raise TypeError(f"target must be an int or an integer tensor, got {type(target).__name__}")
    if (index < 0).any() or (index >= k).any():
        raise ValueError(f"target {index.tolist()} out of range for {k} outputs")
    return index.view(n, 1)


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _static_eval(model: nn.Module, node: fx.Node, step: _Step, args: tuple, kwargs: dict) -> Any:
    def plain(v: Any) -> Any:
        return v.d if isinstance(v, Pair) else v

    args = fx.node.map_aggregate(args, plain)
    kwargs = fx.node.map_aggregate(kwargs, plain)
    if node.op == "call_module":
        return step.module.forward(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def split(
    model: nn.Module,
    maxpool: str = "convex",
    stabilizer: str = "scale",
    input_split: str = "relu",
    merge_batchnorm: bool = False,
    theta: float = 0.1,
    threshold: float = 10.0,
    cache_abs_weights: bool = False,
    nonlinear: str = "error",
) -> SplitModel:
    """Split a trained piecewise-linear model into its split pair ``(g, h)``.

    See :class:`SplitModel` for the parameters.

    Returns
    -------
    SplitModel
        A view of ``model``; ``g, h = split(model)(x)`` gives ``g - h == model(x)``.

    Raises
    ------
    UnsupportedOperation
        When the model contains an operation without an exact split rule (with
        ``nonlinear="error"``) or without any rule.
    """
    return SplitModel(model, maxpool=maxpool, stabilizer=stabilizer, input_split=input_split,
                      merge_batchnorm=merge_batchnorm, theta=theta, threshold=threshold,
                      cache_abs_weights=cache_abs_weights, nonlinear=nonlinear)
