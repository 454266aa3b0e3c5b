"""SplitLRP as a Zennit composite.

:class:`SplitLRP` makes any Zennit attributor (``Gradient``, ``SmoothGrad``,
``IntegratedGradients``, ...) return SplitLRP relevance at the input: epsilon-LRP on the
split pair ``f = g - h`` of the model (paper section 4.2), computed by
:meth:`core.SplitModel.relevance`. The composite hooks only the root module: the root's
output is replaced by a tensor with the same values whose backward pass, given the
attributor's output gradient (the seed), returns the SplitLRP relevance of the input.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from zennit.core import Composite, RemovableHandle, RemovableHandleList

import core
from core import checks
from core.errors import frames_to_user
from core.explaining import eval_semantics
from core.lrp import ACTIVATION_RULES, RESIDUAL_RULES, STREAMS
from core.record import MODULE_HOOK_DICTS
from core.split import INPUT_SPLITS, MAXPOOL_MODES, STABILIZERS


def several_inputs(what: str) -> ValueError:
    """The error for several inputs in the Zennit path, which has one input tensor.

    Parameters
    ----------
    what: str
        What was given (``"split_lrp got a tuple of 2 inputs"``).

    Returns
    -------
    ValueError
        One line that names core's SplitLRP, which takes several inputs.
    """
    return ValueError(
        f"SplitLRP: {what}, but Zennit's attributors pass the model one input tensor; for a "
        "model with several inputs use core's SplitLRP, core.split(model).relevance((x1, x2), "
        "seed, layers=[...]) (one relevance per input under 'input', 'input:1' the second; "
        "further arguments as extra_args= and kwargs=)"
    )


def refuse_inference_mode(who: str) -> None:
    """Raise one clear error inside ``torch.inference_mode()``, where autograd is off.

    Parameters
    ----------
    who: str
        The method, prefixed to the message (``"SplitLRP"``, ``"LRP"``).

    Raises
    ------
    RuntimeError
        Inside ``torch.inference_mode()``. (``torch.no_grad()`` is fine: the methods switch
        gradients on for their own work.)
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{who}: called inside torch.inference_mode(), where autograd (which {who} "
            "uses) is off; call it outside inference mode"
        )


def layer_list(layer: Any, who: str) -> list[str | nn.Module]:
    """The layers given as ``layer``: a module name, a submodule, or a list of them.

    Parameters
    ----------
    layer: str, torch.nn.Module, list or tuple of them, or None
        What the user passed (None: no layer).
    who: str
        The caller, prefixed to the message.

    Returns
    -------
    list
        The names and modules, in order (modules are resolved by :func:`layer_names`).

    Raises
    ------
    TypeError
        One line for anything else (``layer=3``), naming what to pass.
    """
    if layer is None:
        return []
    items = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not all(isinstance(item, (str, nn.Module)) for item in items):
        raise TypeError(
            f"{who}: layer={layer!r} must be a module name as in model.named_modules() "
            "(e.g. 'features.4'), a submodule of the model, or a list of them."
        )
    return items


def layer_names(model: nn.Module, layers: Sequence[str | nn.Module], who: str) -> list[str]:
    """``layers`` with each submodule replaced by its name in ``model`` (names kept as given).

    Parameters
    ----------
    model: torch.nn.Module
        The model the layers belong to.
    layers: list of str or torch.nn.Module
        As returned by :func:`layer_list`.
    who: str
        The caller, prefixed to messages.

    Returns
    -------
    list[str]
        The names; a module is found by identity (:func:`core.checks.layer_name`, which
        raises one ``ValueError`` line for a module of another model).
    """
    return [item if isinstance(item, str) else checks.layer_name(model, item, who)
            for item in layers]


def select_stream(relevance: Any, stream: str) -> torch.Tensor:
    """Return one stream of a relevance object of :meth:`core.SplitModel.relevance`.

    Parameters
    ----------
    relevance: object
        An object with the tensors ``pos`` (``R(l,+)``), ``neg`` (``R(l,-)``) and ``comb``
        (``R(l,+) - R(l,-)``).
    stream: str
        ``"pos"``, ``"neg"`` or ``"comb"``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The selected relevance tensor.
    """
    checks.option("stream", stream, STREAMS, "SplitLRP")
    return getattr(relevance, stream)


def module_slots(model: nn.Module) -> dict[nn.Module, tuple[dict, dict, frozenset]]:
    """Each module's parameter and buffer entries (the objects) and its attribute names.

    Parameters
    ----------
    model: torch.nn.Module
        The model.

    Returns
    -------
    dict
        Module to ``(dict(_parameters), dict(_buffers), names in __dict__)``, for
        :func:`restore_slots`.
    """
    return {m: (dict(m._parameters), dict(m._buffers), frozenset(vars(m)))
            for m in model.modules()}


def restore_slots(before: dict, applied: dict | None = None) -> None:
    """Undo what Zennit left in the modules after its canonizers and rules were removed.

    zennit 1.0 reverts a merged BatchNorm with ``object.__setattr__``, which leaves the
    restored ``weight`` / ``bias`` as instance attributes that shadow the module's parameter
    slots, and a ``bias`` it had to create (``Conv2d(bias=False)``) as a zero parameter (a
    torchvision ResNet-18 came back with 82 parameters instead of 62); its rules modify
    parameters with ``load_state_dict(assign=True)``, so that after a canonizer the merged
    weights end up in the parameter slots (``state_dict()`` no longer the model's) and every
    parameter object is replaced. zennit 0.5.1 leaves nothing of this.

    Parameters
    ----------
    before: dict
        :func:`module_slots` before the canonizers were applied.
    applied: dict, optional
        :func:`module_slots` right after they were applied: only the entries the canonizers
        set, and left as they were since, are reverted (what the user replaced in between
        is theirs). None: every entry goes back to ``before``.
    """
    for module, (params, buffers, names) in before.items():
        for name in [n for n in vars(module) if n not in names]:
            if name in module._parameters or name in module._buffers or name in module._modules:
                del module.__dict__[name]  # a shadow of a slot: never set by nn.Module
        for index, (slot, saved) in enumerate(((module._parameters, params),
                                               (module._buffers, buffers))):
            for name in list(slot):
                if name in saved and slot[name] is saved[name]:
                    continue
                if applied is not None:
                    set_then = applied.get(module, ({}, {}))[index]
                    if (name not in set_then or slot[name] is not set_then[name]
                            or (name in saved and saved[name] is set_then[name])):
                        continue
                if name in saved:
                    slot[name] = saved[name]
                else:
                    del slot[name]


def other_composite(module: nn.Module) -> str | None:
    """The first module (by name) inside ``module`` that carries hooks of a Zennit rule.

    Another composite registered on the model (``EpsilonPlus``, ...) hooks its layers with
    rules (:py:class:`zennit.core.Hook`) that modify the gradient through the model's own
    graph, which SplitLRP's backward pass goes past: nested with SplitLRP, either the rules
    would be ignored or they would run on no gradient at all (a ``TypeError`` inside Zennit).

    Parameters
    ----------
    module: torch.nn.Module
        The module SplitLRP is registered on.

    Returns
    -------
    str or None
        ``"'features.0' (ZPlus)"`` for the first such module, or None.
    """
    for name, child in module.named_modules():
        for attr in MODULE_HOOK_DICTS:
            for hook in getattr(child, attr, {}).values():
                owner = getattr(hook, "__self__", hook)
                if type(owner).__module__.split(".")[0] == "zennit":
                    return f"{name or type(module).__name__!r} ({type(owner).__name__})"
    return None


class _SplitLRPFunction(torch.autograd.Function):
    """Identity on the root output in the forward pass; backwards, the SplitLRP relevance of
    the root input -- or, when the hook was switched off (``Composite.inactive()``) by the
    time of the backward pass, the plain gradient through the model's own graph (Zennit
    reads its hooks' ``active`` flag during the backward pass, too)."""

    @staticmethod
    def forward(ctx, input, output, hook):  # noqa: A002 - torch's argument name
        ctx.hook = hook
        ctx.save_for_backward(input)
        return output.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.hook.active:
            return None, grad_output, None
        if torch.is_grad_enabled():  # a backward pass with create_graph=True
            raise RuntimeError(
                "SplitLRP: the relevance is not a differentiable function of the input, so it "
                "has no gradient of its own (create_graph=True); call the attributor without "
                "create_graph, or use a gradient-based attribution for second-order work."
            )
        (input,) = ctx.saved_tensors
        relevance = ctx.hook.input_relevance(input, grad_output)
        return relevance, None, None


class _RootHook:
    """Hooks on the root module: every forward of the model runs with eval semantics and
    leaves the model as it found it (training flags, buffers), and its output routes the
    backward pass through SplitLRP.

    It has the ``active`` flag of :py:class:`zennit.core.Hook`, read during the backward
    pass, so that :py:meth:`zennit.core.Composite.inactive` switches it off (plain
    gradients then flow).
    """

    split_own = True  # the split's own hooks: core.capture.unwrap lets them sit on a wrapper

    def __init__(self, composite: SplitLRP, module: nn.Module,
                 added: Sequence[nn.Module] = ()) -> None:
        self.active = True
        self.busy = False
        self.composite_ref = weakref.ref(composite)
        self.module_ref = weakref.ref(module)
        self.semantics: list[Any] = []  # one eval_semantics context per forward running
        # modules that the canonizers added (zennit's Sum, created in training mode): not
        # the user's, so their training flag does not make the model "in training mode"
        self.added = weakref.WeakSet(added)

    def register(self, module: nn.Module) -> RemovableHandleList:
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_hook, prepend=True),
            # always_call: the model is restored also when its forward raises
            module.register_forward_hook(self.forward_hook, with_kwargs=True, always_call=True),
        ])

    def remove(self) -> None:
        self.active = False

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        # eval semantics per forward, not per registration: what the user changes in the
        # model between forwards (load_state_dict, train()) is theirs and stays
        self.semantics.append(None)
        if not self.busy:  # not a forward of the split's own computation
            training = any(m.training for m in module.modules() if m not in self.added)
            # the warning points at the user's line: eval_semantics warns from its generator
            # (1) under contextlib's __enter__ (2), then come this hook and the library frames
            semantics = eval_semantics(module, warn=training, stacklevel=3 + frames_to_user())
            semantics.__enter__()
            self.semantics[-1] = semantics

    def forward_hook(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> torch.Tensor | None:
        semantics = self.semantics.pop() if self.semantics else None
        if semantics is not None:
            semantics.__exit__(None, None, None)
        if self.busy or output is None or not torch.is_grad_enabled():
            return None  # the split's own forward, a forward that raised, or no gradient
        inputs = (*args, *kwargs.values())
        tensor = inputs[0] if inputs else None
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return None
        if len(inputs) > 1:
            raise several_inputs(f"the model was called with {len(inputs)} arguments")
        if any(isinstance(getattr(h, "__self__", None), _RootHook) and h.__self__ is not self
               and h.__self__.active for h in module._forward_hooks.values()):
            # the one registered last would answer the backward pass of either attributor
            raise ValueError(
                "SplitLRP: two SplitLRP composites are registered on this model at once, and "
                "the backward pass would return the relevance of the one registered last, "
                "whichever attributor asked; remove one first (leave its `with` block)."
            )
        other = other_composite(module)
        if other is not None:
            raise ValueError(
                f"SplitLRP: module {other} has hooks of another Zennit composite, registered "
                "on the same model; SplitLRP computes the relevance of the whole model "
                "itself and cannot be combined with another composite's rules: remove the "
                "other composite first (leave its `with` block or call its remove())."
            )
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"SplitLRP: the model returned {type(output).__name__}, not one tensor of "
                "logits; wrap the model so that it returns the logits tensor."
            )
        return _SplitLRPFunction.apply(tensor, output, self)

    def input_relevance(self, input: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        composite = self.composite_ref()
        module = self.module_ref()
        if composite is None or module is None:  # pragma: no cover - garbage collected
            raise RuntimeError("SplitLRP: the composite or its model no longer exists.")
        self.busy = True
        # the canonizers' own modules run in eval mode too, so that the split (which warns
        # about a model in training mode) sees the model's flags as the user set them
        added = [m for m in self.added if m.training]
        try:
            for m in added:
                m.training = False
            with torch.enable_grad():
                relevance = composite.compute(module, input.detach(), seed.detach())
        finally:
            self.busy = False
            for m in added:
                m.training = True
        return select_stream(relevance["input"], composite.stream).to(input.dtype)


class _RefuseMixing:
    """What SplitLRP's ``module_map`` gives a composite that mixes it with others
    (:py:class:`zennit.composites.MixedComposite`): a hook template whose copies refuse the
    model's forward with one ``ValueError``. SplitLRP computes the relevance of the whole
    model at its root (:meth:`SplitLRP.register`) and has no per-module rules to lend;
    without this a mix silently dropped it (the other composites' rules, or the plain
    gradient, came back). The error comes at the forward, inside the attributor's ``with``
    block, so that the mixed composite's hooks and canonizers are removed again.
    """

    active = True  # read by zennit.core.Composite.inactive

    def copy(self) -> _RefuseMixing:
        return _RefuseMixing()

    def register(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_pre_hook(self.refuse)

    @staticmethod
    def refuse(module: nn.Module, args: tuple) -> None:
        raise ValueError(
            "SplitLRP cannot be mixed with other composites (zennit's MixedComposite): it "
            "computes the relevance of the whole model itself and has no rules per module; "
            "pass SplitLRP() alone as the attributor's composite."
        )


def refuse_mixing(ctx: dict, name: str, module: nn.Module) -> _RefuseMixing:
    """SplitLRP's ``module_map``: every module gets a :class:`_RefuseMixing` hook.

    Parameters
    ----------
    ctx: dict
        Zennit's context of the registration (unused).
    name: str
        The module's name (unused).
    module: torch.nn.Module
        The module (unused).

    Returns
    -------
    _RefuseMixing
        The template of a hook that refuses the forward with one clear error.
    """
    return _RefuseMixing()


class SplitLRP(Composite):
    """SplitLRP: epsilon-LRP on the split pair ``f = g - h`` of a ReLU network.

    A :py:class:`zennit.core.Composite` that makes any Zennit attributor return the SplitLRP
    relevance of the input instead of the gradient (paper section 4.2). The positive and the
    negative stream of every layer are treated as two sets of neurons of one model; the
    relevance starts at the class output of the positive stream ``a(L,+)`` with the
    attributor's output gradient (a one-hot seed gives total relevance 1 per sample; seeding
    with ``a(L,+)`` gives the paper's total) and is redistributed with the epsilon rule
    (gamma 0) down to the input. BatchNorm is merged into the adjacent affine layer,
    residual adds split relevance evenly across their branches (the paper; all of a stream's
    relevance to one branch where the other's value in that stream is 0; ``residual=
    "proportional"`` uses the epsilon rule of the add instead), and the forward pass is
    stabilised as in SplitCAM, a lowered mass floored at the activation (the parts stay
    non-negative; docs/math.md section 3).

    Parameters
    ----------
    stream: str, optional
        The input relevance returned: ``"pos"`` (``R(0,+)``, default), ``"neg"``
        (``R(0,-)``) or ``"comb"`` (``R(0,+) - R(0,-)``, eq. 10).
    epsilon: float, optional
        Stabiliser of the epsilon rule (eq. 9), added with the sign of the denominator.
    maxpool: str, optional
        Max pooling in the split pair: ``"wta"`` (winner takes all, default; relevance goes to
        the window position where the original activation is largest) or ``"convex"``.
    stabilizer: str, optional
        Forward stabilisation of the split activations: ``"scale"`` (default), ``"shift"`` or
        ``"none"``.
    layer: str, torch.nn.Module or a list of them, optional
        Name(s) of modules (as in ``model.named_modules()``; ``"NAME:0"``, ``"NAME:1"``...
        for the elements of a module's tuple output), or the submodules themselves (kept
        under their names, found when the composite is registered), at whose output the
        relevances
        ``R(l,+)``, ``R(l,-)`` and ``comb`` are also kept, in :py:attr:`relevance` under that
        name (the paper's "(26, pos)" is ``layer="features.26"``, ``stream="pos"``). The
        attributor still returns the input relevance; :func:`zennit_split.split_lrp` returns
        the layer relevances directly.
    canonizers: list[:py:class:`zennit.canonizers.Canonizer`], optional
        Canonizers applied to the model while the composite is registered, as in any Zennit
        composite. BatchNorm is merged by the split itself, so none are needed.
    input_split: str, optional
        How the input is split into ``x = a(0,+) - a(0,-)``: ``"relu"`` (default) or
        ``"half"``.
    activation_rule: str, optional
        How ReLUs pass relevance: ``"pass"`` (default, the paper: LRP ignores the
        activations, ``R(z,+) = R(a,+)``) or ``"wta"`` (the positive stream's Maxout
        ``a+ = max(z+, z-)`` hands its relevance to the winning pre-activation, which keeps
        relevance conserved also where a neuron's ``z+`` is zero).
    residual: str, optional
        How a sum of two activations (a residual add) shares relevance: ``"even"`` (default,
        the paper: half of each stream's relevance to each branch, all of it to one branch
        where the other's value in that stream is 0) or ``"proportional"`` (by the branches'
        contributions).
    nonlinear: str, optional
        ``"error"`` (default) or ``"freeze"``: split smooth units, gates, attention and
        normalisations with their factors frozen (:func:`core.split`); kept as
        :py:attr:`nonlinear`. A product of two activations shares its relevance evenly
        between the factors.

    Attributes
    ----------
    relevance: dict[str, object]
        Filled by every backward pass: ``"input"`` and, if given, ``layer``, each with the
        tensors ``pos``, ``neg`` and ``comb``. Attributors that run several backward passes
        (``SmoothGrad``, ``IntegratedGradients``) leave the last one here.

    Examples
    --------
    >>> from zennit.attribution import Gradient
    >>> with Gradient(model, SplitLRP()) as attributor:
    ...     output, relevance = attributor(x, torch.eye(10)[target])
    """

    def __init__(
        self,
        stream: str = "pos",
        epsilon: float = 1e-6,
        maxpool: str = "wta",
        stabilizer: str = "scale",
        layer: str | nn.Module | Sequence[str | nn.Module] | None = None,
        canonizers: list | None = None,
        *,
        input_split: str = "relu",
        activation_rule: str = "pass",
        residual: str = "even",
        nonlinear: str = "error",
    ) -> None:
        checks.option("stream", stream, STREAMS, "SplitLRP")
        checks.option("residual", residual, RESIDUAL_RULES, "SplitLRP")
        checks.option("maxpool", maxpool, MAXPOOL_MODES, "SplitLRP")
        checks.option("stabilizer", stabilizer, STABILIZERS, "SplitLRP")
        checks.option("input_split", input_split, INPUT_SPLITS, "SplitLRP")
        checks.option("activation_rule", activation_rule, ACTIVATION_RULES, "SplitLRP")
        checks.option("nonlinear", nonlinear, core.NONLINEAR_MODES, "SplitLRP")
        checks.number("epsilon", epsilon, 0.0, who="SplitLRP")
        layers = layer_list(layer, "SplitLRP")
        # only a composite that mixes SplitLRP with others reads module_map (register does not)
        super().__init__(module_map=refuse_mixing, canonizers=canonizers)
        self.stream = stream
        self.epsilon = float(epsilon)
        self.maxpool = maxpool
        self.stabilizer = stabilizer
        self.layer = layer
        self.layers = tuple(layers)
        self.input_split = input_split
        self.activation_rule = activation_rule
        self.residual = residual
        self.nonlinear = nonlinear
        self.relevance: dict[str, Any] = {}

    def register(self, module: nn.Module) -> None:
        """Apply the canonizers and hook the root ``module``.

        Parameters
        ----------
        module: :py:class:`torch.nn.Module`
            The model to explain. Only the root gets a forward hook; the canonizers are
            applied recursively, as in :py:meth:`zennit.core.Composite.register`.

        Raises
        ------
        ValueError
            For an unknown layer name or a module of another model, and for
            ``"input:1"``...: Zennit passes one input tensor (:func:`several_inputs`; core's
            :meth:`core.SplitModel.relevance` takes several). A model called with several
            arguments inside the composite is refused with the same error at its forward.
        """
        self.remove()
        self.relevance = {}
        self.layers = tuple(layer_names(module, layer_list(self.layer, "SplitLRP"), "SplitLRP"))
        for name in self.layers:
            base, _, suffix = name.rpartition(":")
            if (base == "input" and suffix.isdigit()
                    and not checks.names_a_layer(dict(module.named_modules()), name, True)):
                raise several_inputs(f"layer {name!r} names an input of several")
            checks.layer_name(module, name, "SplitLRP", allow_input=True, allow_elements=True)
        before = set(module.modules())
        self._slots = (module_slots(module), None)
        try:
            for canonizer in self.canonizers:
                self.handles += canonizer.apply(module)
            self._slots = (self._slots[0], module_slots(module))
            added = [m for m in module.modules() if m not in before]
            hook = _RootHook(self, module, added)
            self.hook_refs.add(hook)
            self.handles.append(hook.register(module))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the hooks and revert the canonizers (:py:attr:`relevance` is kept); what
        zennit 1.0's reverts leave behind is undone (:func:`restore_slots`)."""
        super().remove()
        slots, self._slots = getattr(self, "_slots", None), None
        if slots is not None and self.canonizers:
            restore_slots(slots[0], slots[1] or {})

    def compute(
        self, module: nn.Module, input: torch.Tensor, seed: torch.Tensor  # noqa: A002
    ) -> dict[str, Any]:
        """Compute the SplitLRP relevances of ``module`` for ``input`` and output seed ``seed``.

        Parameters
        ----------
        module: :py:class:`torch.nn.Module`
            The model.
        input: :py:obj:`torch.Tensor`
            The model input.
        seed: :py:obj:`torch.Tensor`
            Relevance of the positive output stream ``a(L,+)``, shaped like the model output.

        Returns
        -------
        dict[str, object]
            ``"input"`` (and ``layer`` if set) to objects with ``pos``, ``neg`` and ``comb``.
        """
        # split on every backward pass: a model changed since the last one (a module replaced
        # inside the attributor's context) is split anew; an unchanged one costs a
        # fingerprint (core.reuse)
        split_model = core.split(
            module,
            maxpool=self.maxpool,
            stabilizer=self.stabilizer,
            input_split=self.input_split,
            merge_batchnorm=True,
            nonlinear=self.nonlinear,
        )
        layers = tuple(name for name in self.layers if name not in ("", "input"))
        relevance = split_model.relevance(
            input, seed, layers=layers, epsilon=self.epsilon,
            activation_rule=self.activation_rule, residual=self.residual,
        )
        relevance = {name: relevance[name] for name in ("input", *layers)}
        if "" in self.layers:
            relevance[""] = relevance["input"]
        self.relevance = relevance
        return relevance
