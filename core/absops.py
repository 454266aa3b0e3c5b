"""Affine maps with ``|W|`` that do not keep ``|W|`` alive for the backward pass.

The ``s`` stream goes through ``|W| s + |b|``. Autograd would save the temporary ``|W|`` of
every layer until the backward pass (for VGG16 that is another copy of its 528 MiB of
weights); these functions save the model's own weight instead and take its absolute value
again in the backward pass. With ``value=False`` they compute no product at all and return a
placeholder whose backward is exact (the ``s`` stream above the deepest probe of the
sensitivities, whose values nothing reads; docs/math.md section 4); :func:`placeholder` does
the same for the elementwise rules there (BatchNorm, ReLU, sums) and the convex max pooling.
:func:`channel_affine` is BatchNorm's ``|k| s + |t|`` on the batch norm kernel, with the
product as its backward.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

#: ``F.conv{n}d`` by the number of spatial dimensions
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_input(n: int, shape, weight, grad, stride, padding, dilation, groups):
    """The gradient of ``conv{n}d`` at its input (``torch.nn.grad.conv{n}d_input``, the same
    kernel), with an uninitialised input of ``shape`` instead of torch's expanded one, which
    the non-mkldnn kernels (1x1 convolutions on one thread) copy to a full tensor first."""
    return torch.ops.aten.convolution_backward(
        grad, grad.new_empty(shape), weight, None, _tuple(stride, n), _tuple(padding, n),
        _tuple(dilation, n), False, [0] * n, groups, (True, False, False))[0]


# |W| of a large linear layer is taken in blocks of rows of at most this many entries, so
# that no full-size temporary copy of the weight exists (VGG16's first classifier layer
# would need 392 MiB).
BLOCK = 1 << 22


def _row_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    rows = weight.shape[0]
    step = max(1, BLOCK // max(1, weight[0].numel()))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


class AbsScratch:
    """A reused buffer for the ``|W|`` of one layer at a time, one per thread, device and dtype.

    A new ``|W|`` per layer and call is fresh memory that the operating system maps page by
    page (ResNet50's forward at batch 1: about 18 000 page faults per call, 12 % of its
    time); the buffer is written again for every layer instead. It holds at most
    :data:`BLOCK` entries (16 MiB in float32); larger weights get a new ``|W|``. ``|W|`` is
    read only by the product it is taken for, never kept (the backward pass takes it again),
    so one buffer serves every split model of a thread: :data:`SCRATCH` is the one they
    share, so that an adapter that splits the model again at every call (an unchanged
    model's split is a new object around the kept capture, :mod:`core.reuse`) does not map
    a new buffer each time. Each thread has its own buffers (autograd runs a CUDA backward
    pass on a thread of its own); they stay allocated while the thread lives.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def abs(self, weight: torch.Tensor) -> torch.Tensor:
        """``|weight|``, in the buffer where it fits (valid until the next call)."""
        n = weight.numel()
        if n > BLOCK or (weight.requires_grad and torch.is_grad_enabled()) or not _dense(weight):
            return weight.abs()
        try:
            buffers = self._local.buffers
        except AttributeError:
            buffers = self._local.buffers = {}
        key = (weight.device, weight.dtype)
        kept = buffers.get(key)
        if kept is None or kept[0].numel() < n:
            kept = buffers[key] = (weight.new_empty(n), {})
        buffer, views = kept
        # the weight's own strides (channels_last stays channels_last, as with weight.abs());
        # a view per shape and strides, kept with the buffer (two operations fewer per layer)
        shape = (weight.shape, weight.stride())
        view = views.get(shape)
        if view is None:
            if len(views) >= 1024:  # many models of many shapes: start again
                views.clear()
            view = views[shape] = buffer[:n].as_strided(*shape)
        return torch.abs(weight, out=view)


SCRATCH = AbsScratch()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous in the standard or the channels-last memory format."""
    if t.is_contiguous():
        return True
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return last is not None and t.is_contiguous(memory_format=last)


def _abs(weight: torch.Tensor, scratch: AbsScratch | None) -> torch.Tensor:
    return weight.abs() if scratch is None else scratch.abs(weight)


def _backward_scratch(scratch: AbsScratch | None) -> AbsScratch | None:
    # a backward pass with create_graph=True records its products: |W| must stay intact
    return None if torch.is_grad_enabled() else scratch


def _linear_abs(s: torch.Tensor, weight: torch.Tensor, bias_abs: torch.Tensor | None,
                scratch: AbsScratch | None = None) -> torch.Tensor:
    if weight.numel() <= BLOCK:
        return F.linear(s, _abs(weight, scratch), bias_abs)
    parts = [F.linear(s, _abs(weight[a:b], scratch), None if bias_abs is None else bias_abs[a:b])
             for a, b in _row_blocks(weight)]
    return torch.cat(parts, dim=-1)


def _absolute(weight: torch.Tensor, is_abs: bool, scratch: AbsScratch | None) -> torch.Tensor:
    return weight if is_abs else _abs(weight, scratch)


def _placeholder(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A value nobody reads: zeros of ``shape`` that take no memory (one expanded zero)."""
    return like.new_zeros(()).expand(shape)


class _AbsLinear(torch.autograd.Function):
    """``F.linear(s, |W|, |b|)``; with ``value=False`` the forward returns a placeholder
    (no product is computed) and only the backward ``grad |W|`` is exact."""

    @staticmethod
    def forward(ctx, s, weight, bias_abs, value=True, is_abs=False,  # noqa: D102
                scratch=None):
        ctx.save_for_backward(weight)
        ctx.is_abs, ctx.scratch = is_abs, scratch
        if not value:
            return _placeholder(s, s.shape[:-1] + weight.shape[:1])
        if is_abs:
            return F.linear(s, weight, bias_abs)
        return _linear_abs(s, weight, bias_abs, scratch)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        none = (None,) * 5
        scratch = _backward_scratch(ctx.scratch)
        if ctx.is_abs or weight.numel() <= BLOCK:
            return (grad @ _absolute(weight, ctx.is_abs, scratch), *none)
        out = None
        for a, b in _row_blocks(weight):
            part = grad[..., a:b] @ _abs(weight[a:b], scratch)
            out = part if out is None else out.add_(part)
        return (out, *none)


def is_channel_product(s: torch.Tensor, weight: torch.Tensor, stride, padding,
                       groups: int) -> bool:
    """Whether ``conv(s, |W|)`` is the matrix product ``|W| s`` over the channels: a kernel of
    ``1`` in every spatial dimension, stride 1, no padding, one group, a contiguous float32
    or float64 ``s`` on the CPU, where the product is faster (ResNet50's 33 such layers on
    their own inputs at 224x224, one sample, two threads, ``|W|`` included: 23.3 ms against
    18.1 ms; in the split's forward 1-2 % at batch 1 and 4 % at batch 8)."""
    n = weight.dim() - 2
    return (s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64)
            and groups == 1 and n >= 1 and s.dim() == n + 2 and s.is_contiguous()
            and all(k == 1 for k in weight.shape[2:])
            and all(k == 1 for k in _tuple(stride, n))
            and (isinstance(padding, str) or not any(_tuple(padding, n))))


def _channel_product(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """``conv(x, W, b)`` of a ``1x1`` kernel (:func:`is_channel_product`) as ``W x`` over the
    channels: ``(O, C) @ (B, C, L)``; ``W`` of shape ``(O, C, 1, ..)``."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    length = math.prod(x.shape[2:])  # not -1: an empty batch is no shape to infer it from
    if x.shape[0] == 1:  # one sample: one matrix product, no batch of them
        out = torch.mm(w, x.reshape(x.shape[1], length))
    else:
        out = torch.matmul(w, x.reshape(x.shape[0], x.shape[1], length))
    if bias is not None:
        out += bias.view(-1, 1)
    return out.view((x.shape[0], weight.shape[0]) + x.shape[2:])


class _AbsConv(torch.autograd.Function):
    """``conv(s, |W|, |b|)``; with ``value=False`` the forward returns a placeholder of
    ``out_shape`` (no convolution is computed) and only the backward is exact. A
    :func:`is_channel_product` one is a matrix product both ways."""

    @staticmethod
    def forward(ctx, s, weight, bias_abs, n, stride, padding, dilation, groups,  # noqa: D102
                value=True, is_abs=False, out_shape=None, scratch=None):
        ctx.save_for_backward(weight)
        product = is_channel_product(s, weight, stride, padding, groups)
        ctx.meta = (n, s.shape, stride, padding, dilation, groups, is_abs, scratch, product)
        if not value:
            return _placeholder(s, out_shape)
        if product:
            return _channel_product(_absolute(weight, is_abs, scratch), s, bias_abs)
        return CONV[n](s, _absolute(weight, is_abs, scratch), bias_abs, stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        n, shape, stride, padding, dilation, groups, is_abs, scratch, product = ctx.meta
        scratch = _backward_scratch(scratch)
        weight = in_dtype_of(grad, _absolute(weight, is_abs, scratch))
        if product:
            grad_in = _channel_product(weight.reshape(weight.shape[:2]).t(), grad)
        else:
            grad_in = conv_input(n, shape, weight, grad, stride, padding, dilation, groups)
        return (grad_in,) + (None,) * 11


def in_dtype_of(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in ``grad``'s dtype, for a convolution backward: under ``torch.autocast``
    the forward ran in that dtype, and a double backward (``create_graph=True``) convolves
    with this weight ("Input type ... and weight type ... should be the same" otherwise)."""
    return weight if weight.dtype == grad.dtype else weight.to(grad.dtype)


def _needs_graph(s: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and s.requires_grad


def input_only_grad(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether autograd records ``x`` and none of ``params`` (None entries skipped) needs a
    gradient: a custom backward in ``x`` alone is then the whole gradient."""
    return _needs_graph(x) and not any(t is not None and t.requires_grad for t in params)


def abs_linear(s: torch.Tensor, weight: torch.Tensor, bias_abs: torch.Tensor | None,
               value: bool = True, is_abs: bool = False,
               scratch: AbsScratch | None = None) -> torch.Tensor:
    """``F.linear(s, |W|, |b|)``; ``weight`` is the signed weight (detached), or ``|W|``
    itself with ``is_abs``.

    ``value=False`` (under autograd, for an ``s`` that requires grad): the result is a
    placeholder whose backward is exact -- for the ``s`` stream above the deepest probe of
    :meth:`core.SplitModel.sensitivities`, whose values nothing reads. ``scratch``: where
    ``|W|`` is written (:class:`AbsScratch`; default a new tensor).
    """
    if _needs_graph(s):
        return _AbsLinear.apply(s, weight, bias_abs, value, is_abs, scratch)
    if is_abs:
        return F.linear(s, weight, bias_abs)
    return _linear_abs(s, weight, bias_abs, scratch)


def abs_conv(s: torch.Tensor, weight: torch.Tensor, bias_abs: torch.Tensor | None, n: int,
             stride, padding, dilation, groups: int, value: bool = True, is_abs: bool = False,
             out_shape: tuple[int, ...] | None = None,
             scratch: AbsScratch | None = None) -> torch.Tensor:
    """``F.conv{n}d(s, |W|, |b|, ...)`` with numeric (zero) padding; ``value=False`` (needs
    ``out_shape``), ``is_abs`` and ``scratch`` as for :func:`abs_linear`."""
    if _needs_graph(s):
        if not isinstance(padding, str):
            value = value or out_shape is None
            return _AbsConv.apply(s, weight, bias_abs, n, stride, padding, dilation, groups,
                                  value, is_abs, out_shape, scratch)
        scratch = None  # "same"/"valid" padding under autograd: the product keeps |W|
    if is_channel_product(s, weight, stride, padding, groups):
        return _channel_product(_absolute(weight, is_abs, scratch), s, bias_abs)
    return CONV[n](s, _absolute(weight, is_abs, scratch), bias_abs, stride, padding, dilation,
                    groups)


def _channel_column(k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return k.view((1, -1) + (1,) * (like.dim() - 2))


def eval_batch_norm_(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor | None:
    """``F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)`` written into
    ``x`` (no autograd), bit for bit the out-of-place values: the CPU kernel of an eval
    batch norm reads each element once, before it writes it. None where that kernel does
    not apply (another device, a non-contiguous ``x``, statistics of another dtype): then
    compute it out of place."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.dim() < 2:
        return None
    for v in (mean, var, weight, bias):
        if v is not None and v.dtype != x.dtype:
            return None
    none = _NO_STATISTICS.get((x.dtype, x.device))
    if none is None:  # the kernel leaves them empty in eval mode: one pair serves every call
        none = _NO_STATISTICS[(x.dtype, x.device)] = (x.new_empty(0), x.new_empty(0))
    torch.ops.aten.native_batch_norm.out(x, weight, bias, mean, var, False, 0.0, eps, out=x,
                                         save_mean=none[0], save_invstd=none[1])
    return x


# the (empty) batch statistics outputs of eval_batch_norm_, by dtype and device
_NO_STATISTICS: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _batch_norm_affine(s: torch.Tensor, k: torch.Tensor, t: torch.Tensor,
                       inplace: bool = False, moments: tuple | None = None) -> torch.Tensor:
    # a batch norm with mean 0, variance 1 and eps 0 multiplies by k exactly
    mean, var = moments if moments is not None else (torch.zeros_like(k), torch.ones_like(k))
    out = eval_batch_norm_(s, mean, var, k, t, 0.0) if inplace else None
    return out if out is not None else F.batch_norm(s, mean, var, k, t, False, 0.0, 0.0)


class _ChannelAffine(torch.autograd.Function):
    """``k s + t`` per channel; the backward is ``grad * k`` (a batch norm's backward is
    slower than that product)."""

    @staticmethod
    def forward(ctx, s, k, t):  # noqa: D102
        ctx.save_for_backward(k)
        return _batch_norm_affine(s, k, t)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (k,) = ctx.saved_tensors
        return grad * _channel_column(k, grad), None, None


def channel_affine(s: torch.Tensor, k: torch.Tensor, t: torch.Tensor,
                   value: bool = True, inplace: bool = False,
                   moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``k s + t`` with per-channel vectors ``k`` and ``t`` (along dim 1, no gradient), for
    the ``s`` stream of a BatchNorm.

    The forward runs the batch norm kernel with mean 0, variance 1 and eps 0, which is
    1.5-2.5x faster on CPU than the broadcasting ``addcmul``; the backward is ``grad * k``.
    ``value=False``: a :func:`placeholder` with that backward (where the inputs allow).
    ``inplace``: written into ``s`` where :func:`eval_batch_norm_` can (no autograd; the
    caller owns ``s``). ``moments``: the zeros and ones (like ``k``) that the kernel is
    called with, where the caller keeps them (default: made anew).
    """
    if not value:
        out = placeholder(lambda g: (g * _channel_column(k, g),), s)
        if out is not None:
            return out
    if torch.is_grad_enabled() and s.requires_grad:
        return _ChannelAffine.apply(s, k, t)
    return _batch_norm_affine(s, k, t, inplace, moments)


class _BatchNormEval(torch.autograd.Function):
    """``F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)`` (torch's own
    forward, bit for bit) whose backward in ``x`` is ``grad * k`` with ``k = weight /
    sqrt(var + eps)``: 2.3x faster on CPU than torch's batch norm backward (256 channels at
    56x56, batch 8: 0.93 ms against 2.16 ms), which the ``d`` stream runs in both backward
    passes of the sensitivities."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, k):  # noqa: D102
        ctx.save_for_backward(k)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (k,) = ctx.saved_tensors
        return (grad * _channel_column(k, grad),) + (None,) * 6


def batch_norm_eval(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    k: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm of ``x`` whose backward is ``grad * k`` (``k`` the per-channel
    ``weight / sqrt(var + eps)``), where only ``x`` requires grad; otherwise torch's
    ``F.batch_norm`` as it is."""
    if x.dim() >= 2 and input_only_grad(x, mean, var, weight, bias):
        return _BatchNormEval.apply(x, mean, var, weight, bias, eps, k)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


class _Placeholder(torch.autograd.Function):
    """A placeholder value whose backward is ``vjp(grad)``."""

    @staticmethod
    def forward(ctx, vjp, shape, *inputs):  # noqa: D102
        ctx.vjp = vjp
        return _placeholder(inputs[0], shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return (None, None, *ctx.vjp(grad))


def placeholder(vjp, *inputs: torch.Tensor, shape: torch.Size | None = None
                ) -> torch.Tensor | None:
    """A value nobody reads, of the inputs' (common) shape or of ``shape``, whose backward is
    ``vjp(grad)`` (one gradient per input): a ``mass_linear`` rule's ``s`` above the deepest
    probe, where only the backward pass of the ``s`` stream is needed. None where no input
    requires grad, or without ``shape`` where the inputs do not all have one shape (then
    compute the value)."""
    if shape is None:
        shape = inputs[0].shape
        if not all(t.shape == shape for t in inputs):
            return None
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return None
    return _Placeholder.apply(vjp, shape, *inputs)


def _negative_part_grad(grad: torch.Tensor, relu_out: torch.Tensor) -> torch.Tensor:
    """The backward of ``relu(-z)``: ``-grad`` where ``relu(z) == 0``, else 0, as the ReLU's
    own backward (``grad`` where ``relu(z) > 0``) minus ``grad``: two passes and no mask
    tensor, about 4x faster on CPU than ``where(relu_out == 0, -grad, 0)`` (the same values;
    a zero may carry the other sign)."""
    return torch.ops.aten.threshold_backward(grad, relu_out, 0).sub_(grad)


class _NegativePart(torch.autograd.Function):
    """``relu(-z)`` whose backward reads the mask off the ReLU's own output ``relu(z)``.

    Autograd would keep the pre-activation ``z`` alive for the mask; the ReLU's output is
    kept anyway (by the ReLU itself and the next layer), so saving it costs nothing.
    """

    @staticmethod
    def forward(ctx, z, relu_out):  # noqa: D102
        ctx.save_for_backward(relu_out)
        return torch.sub(relu_out, z)  # relu(z) - z == relu(-z) exactly, in one pass

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (relu_out,) = ctx.saved_tensors
        return _negative_part_grad(grad, relu_out), None


def add_negative_part(s: torch.Tensor, z: torch.Tensor, relu_out: torch.Tensor,
                      value: bool = True) -> torch.Tensor:
    """``s + relu(-z)`` given ``relu_out = relu(z)``; the derivative in ``z`` is
    ``-1{z <= 0}`` (so that it and the ReLU's ``1{z > 0}`` add up to one). ``value=False``:
    a :func:`placeholder` with that backward."""
    if not value:
        out = placeholder(lambda g: (g, _negative_part_grad(g, relu_out)), s, z)
        if out is not None:
            return out
    if torch.is_grad_enabled() and (z.requires_grad or s.requires_grad):
        return s + _NegativePart.apply(z, relu_out)
    return torch.sub(s, z.clamp_max(0))
