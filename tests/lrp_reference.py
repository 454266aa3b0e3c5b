"""A slow, explicit SplitLRP reference for small models (tests only).

The split pair is built as the paper writes it (section 3.1): four products per affine layer
with ``W+ = max(W, 0)`` and ``W- = max(-W, 0)``, two stored streams ``a+`` and ``a-``, a
Maxout unit in the g stream, all in float64. Relevance is redistributed with the textbook
epsilon rule (paper eq. 9 with gamma = 0)::

    R_j = sum_i z_ij / (z_i + eps * sign(z_i)) * R_i,      sign(0) := 1,

where the ``z_ij`` are the explicit contributions of the neurons ``j`` of both streams to the
neuron ``i`` of either stream, and ``z_i`` is that neuron's value (with its bias part). The
positive and negative streams are two sets of neurons of one model. The forward stabilisation
passes relevance unchanged; the Maxout ``a+ = max(z+, z-)`` hands it to the winning
pre-activation (``maxout="wta"``, the original model's positivity pattern decides) or to
``z+`` (``maxout="pass"``); the identity ``a- = z-`` passes it on.

Supported: ``nn.Sequential`` of Linear, Conv2d (groups 1), BatchNorm (merged into the
preceding Linear / Conv2d), ReLU, MaxPool2d, AvgPool2d (no padding), AdaptiveAvgPool2d(1),
Flatten, Dropout (eval), Identity, and :class:`Residual` blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Streams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a+, a-, original activation d)
Backward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Residual(nn.Module):
    """``y = body(x) + shortcut(x)`` (identity shortcut by default)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


@dataclass
class ReferenceRelevance:
    """Relevance of both streams at one node."""

    pos: torch.Tensor
    neg: torch.Tensor

    @property
    def comb(self) -> torch.Tensor:
        return self.pos - self.neg


@dataclass
class Options:
    epsilon: float = 1e-6
    maxpool: str = "wta"
    stabilizer: str = "scale"
    input_split: str = "relu"
    residual: str = "even"
    maxout: str = "pass"
    theta: float = 0.1
    threshold: float = 10.0
    bias_in_denominator: bool = True
    keep_parts: bool = False  # "scale" keeps s >= |d| (SplitLRP's forward)


def _stab(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return z + epsilon * ((z == 0).to(z) + z.sign())


def _pos(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _neg(t: torch.Tensor) -> torch.Tensor:
    return (-t).clamp(min=0)


def merge_batchnorm(model: nn.Module) -> nn.Module:
    """Return a float64 copy of ``model`` with every BatchNorm merged into the layer before it."""
    # tensors computed into module attributes (zennit 1.0's canonizers set the merged
    # weights so) cannot be deep-copied and .double() skips them: copied here, in float64
    memo = {id(v): v.detach().to(torch.float64, copy=True) for m in model.modules()
            for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf and v.is_floating_point()}
    model = copy.deepcopy(model, memo).double().eval()

    def merge(seq: nn.Module) -> None:
        for child in seq.children():
            merge(child)
        if not isinstance(seq, nn.Sequential):
            return
        for i in range(1, len(seq)):
            bn = seq[i]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            layer = seq[i - 1]
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise NotImplementedError("reference: BatchNorm must follow Linear / Conv2d")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (layer.weight.ndim - 1)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
            with torch.no_grad():
                layer.weight = nn.Parameter(layer.weight * scale.reshape(shape))
                layer.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            seq[i] = nn.Identity()

    merge(model)
    return model


class _Reference:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.recorded: dict[str, ReferenceRelevance] = {}

    # -- affine layers: the four products, explicit contributions -----------------------
    def _affine(self, a: Streams, weight: torch.Tensor, bias: torch.Tensor | None,
                patches: Callable[[torch.Tensor], torch.Tensor],
                fold: Callable[[torch.Tensor], torch.Tensor],
                out_shape: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Streams, Backward]:
        ap, an, d = a
        w = weight.reshape(weight.shape[0], -1)                   # (O, K)
        wp, wn = _pos(w), _neg(w)
        pp, pn, pd = patches(ap), patches(an), patches(d)         # (B, K, L)
        # contributions z_ij (B, O, K, L): stream of the input neuron -> stream of the output
        c_pp = pp[:, None] * wp[None, :, :, None]   # a+_j -> z+_i  (W+)
        c_np = pn[:, None] * wn[None, :, :, None]   # a-_j -> z+_i  (W-)
        c_pn = pp[:, None] * wn[None, :, :, None]   # a+_j -> z-_i  (W-)
        c_nn = pn[:, None] * wp[None, :, :, None]   # a-_j -> z-_i  (W+)
        b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias
        bp, bn = _pos(b)[None, :, None], _neg(b)[None, :, None]
        zp = c_pp.sum(2) + c_np.sum(2) + bp                       # (B, O, L)
        zn = c_pn.sum(2) + c_nn.sum(2) + bn
        dz = torch.einsum("ok,bkl->bol", w, pd) + b[None, :, None]
        eps = self.o.epsilon
        den_p = _stab(zp if self.o.bias_in_denominator else zp - bp, eps)
        den_n = _stab(zn if self.o.bias_in_denominator else zn - bn, eps)

        def backward(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            qp = (rp.reshape(zp.shape) / den_p)[:, :, None]       # R_i / z_i
            qn = (rn.reshape(zn.shape) / den_n)[:, :, None]
            r_ap = (c_pp * qp).sum(1) + (c_pn * qn).sum(1)        # (B, K, L)
            r_an = (c_np * qp).sum(1) + (c_nn * qn).sum(1)
            return fold(r_ap), fold(r_an)

        return (out_shape(zp), out_shape(zn), out_shape(dz)), backward

    def linear(self, m: nn.Linear, a: Streams) -> tuple[Streams, Backward]:
        return self._affine(
            a, m.weight, m.bias,
            patches=lambda t: t[:, :, None],
            fold=lambda t: t[:, :, 0],
            out_shape=lambda t: t[:, :, 0],
        )

    def conv(self, m: nn.Conv2d, a: Streams) -> tuple[Streams, Backward]:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise NotImplementedError("reference: Conv2d with groups 1 and numeric zero padding")
        size = a[0].shape[-2:]
        kw = dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding,
                  stride=m.stride)
        h_out = (size[0] + 2 * m.padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1)
        w_out = (size[1] + 2 * m.padding[1] - m.dilation[1] * (m.kernel_size[1] - 1) - 1)
        out_hw = (h_out // m.stride[0] + 1, w_out // m.stride[1] + 1)
        return self._affine(
            a, m.weight, m.bias,
            patches=lambda t: F.unfold(t, **kw),
            fold=lambda t: F.fold(t, output_size=size, **kw),
            out_shape=lambda t: t.reshape(*t.shape[:2], *out_hw),
        )

    # -- activation: Maxout in g, identity in h, then forward stabilisation --------------
    def relu(self, a: Streams) -> tuple[Streams, Backward]:
        zp, zn, dz = a
        ap, an = torch.maximum(zp, zn), zn
        d = torch.relu(dz)
        ap, an = self._stabilise(ap, an)
        if self.o.maxout == "pass":   # R(z+) = R(a+), R(z-) = R(a-)
            return (ap, an, d), lambda rp, rn: (rp, rn)
        # "wta": a+ = max(z+, z-) hands its relevance to the larger pre-activation
        plus_wins = (dz >= 0).to(zp)   # the original model's positivity pattern

        def backward(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rp * plus_wins, rn + rp * (1 - plus_wins)

        return (ap, an, d), backward

    def _stabilise(self, ap: torch.Tensor, an: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """core's stabilisers, per sample whose ``max(|a+|, |a-|)`` exceeds the threshold.

        "scale": ``s <- theta**k s`` with the least ``k >= 1`` after which ``max |s| / 2`` is
        at most the threshold, then ``max(s, |d|)`` with ``keep_parts`` (SplitLRP's forward:
        the parts stay non-negative); "shift": ``s <- 0``, i.e. the pair ``(d / 2, -d / 2)``.
        """
        mode = self.o.stabilizer
        if mode == "none":
            return ap, an
        s, d = ap + an, ap - an
        dims = tuple(range(1, ap.ndim))
        view = (-1,) + (1,) * (ap.ndim - 1)
        hit = (torch.maximum(ap.abs(), an.abs()).amax(dims) > self.o.threshold).reshape(view)
        if mode == "scale":
            k = torch.zeros(ap.shape[0], dtype=ap.dtype)
            for row in range(ap.shape[0]):
                if hit.reshape(-1)[row]:
                    k[row] = 1
                    while (s[row] * self.o.theta ** k[row]).abs().max() / 2 > self.o.threshold:
                        k[row] += 1
            s = s * (self.o.theta ** k).reshape(view)
            if self.o.keep_parts:  # SplitLRP keeps the parts of a scaled sample >= 0
                s = torch.where(hit, torch.maximum(s, d.abs()), s)
        elif mode == "shift":
            s = torch.where(hit, torch.zeros_like(s), s)
        else:
            raise ValueError(mode)
        return (s + d) / 2, (s - d) / 2

    # -- pooling --------------------------------------------------------------------------
    def maxpool(self, m: nn.MaxPool2d, a: Streams) -> tuple[Streams, Backward]:
        ap, an, d = a
        if m.dilation not in (1, (1, 1)) or m.ceil_mode:
            raise NotImplementedError("reference: MaxPool2d without dilation / ceil_mode")
        k = (m.kernel_size,) * 2 if isinstance(m.kernel_size, int) else m.kernel_size
        st = (m.stride,) * 2 if isinstance(m.stride, int) else m.stride
        pad = (m.padding,) * 2 if isinstance(m.padding, int) else m.padding
        size = ap.shape[-2:]
        bsz, ch = ap.shape[:2]
        kw = dict(kernel_size=k, stride=st, padding=pad)

        def windows(t: torch.Tensor) -> torch.Tensor:   # (B, C, k*k, L)
            return F.unfold(t, **kw).reshape(bsz, ch, k[0] * k[1], -1)

        def unwindows(t: torch.Tensor) -> torch.Tensor:
            return F.fold(t.reshape(bsz, ch * k[0] * k[1], -1), output_size=size, **kw)

        out_hw = F.max_pool2d(d, k, st, pad).shape[-2:]
        # padding never wins: pad d with -inf
        d_pad = F.pad(d, (pad[1], pad[1], pad[0], pad[0]), value=-float("inf"))
        wd = F.unfold(d_pad, kernel_size=k, stride=st).reshape(bsz, ch, k[0] * k[1], -1)
        winner = F.one_hot(wd.argmax(2), k[0] * k[1]).movedim(-1, 2).to(ap)  # (B, C, kk, L)
        wp, wn = windows(ap), windows(an)
        d_out = (wd * winner).nan_to_num(0.0).sum(2)

        def shape(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bsz, ch, *out_hw)

        if self.o.maxpool == "wta":
            out = (shape((wp * winner).sum(2)), shape((wn * winner).sum(2)), shape(d_out))

            def backward(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                rp_w = winner * rp.reshape(bsz, ch, 1, -1)
                rn_w = winner * rn.reshape(bsz, ch, 1, -1)
                return unwindows(rp_w), unwindows(rn_w)

            return out, backward
        # convex: a+' = a+_j* + sum_{i != j*} a-_i, a-' = sum_i a-_i
        c_p_from_p = wp * winner                      # contributions to a+'
        c_p_from_n = wn * (1 - winner)
        c_n_from_n = wn                               # contributions to a-'
        zp = c_p_from_p.sum(2) + c_p_from_n.sum(2)
        zn = c_n_from_n.sum(2)
        eps = self.o.epsilon

        def backward_convex(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, ...]:
            qp = (rp.reshape(zp.shape) / _stab(zp, eps))[:, :, None]
            qn = (rn.reshape(zn.shape) / _stab(zn, eps))[:, :, None]
            return unwindows(c_p_from_p * qp), unwindows(c_p_from_n * qp + c_n_from_n * qn)

        return (shape(zp), shape(zn), shape(d_out)), backward_convex

    def avgpool(self, m: nn.Module, a: Streams) -> tuple[Streams, Backward]:
        ap = a[0]
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if m.output_size not in (1, (1, 1)):
                raise NotImplementedError("reference: AdaptiveAvgPool2d(1) only")
            k, st = tuple(ap.shape[-2:]), tuple(ap.shape[-2:])
        else:
            if m.padding not in (0, (0, 0)) or m.ceil_mode:
                raise NotImplementedError("reference: AvgPool2d without padding")
            k = (m.kernel_size,) * 2 if isinstance(m.kernel_size, int) else m.kernel_size
            stride = m.stride if m.stride is not None else m.kernel_size
            st = (stride,) * 2 if isinstance(stride, int) else stride
        ch = ap.shape[1]
        # average pooling as a convolution with a fixed non-negative (diagonal) kernel
        weight = torch.zeros(ch, ch, *k, dtype=ap.dtype)
        weight[range(ch), range(ch)] = 1.0 / (k[0] * k[1])
        conv = nn.Conv2d(ch, ch, k, stride=st, bias=False).double()
        conv.weight = nn.Parameter(weight)
        return self.conv(conv, a)

    # -- graph --------------------------------------------------------------------------
    def module(self, m: nn.Module, name: str, a: Streams) -> tuple[Streams, Backward]:
        if isinstance(m, nn.Sequential):
            steps = []
            for key, child in m.named_children():
                a, bwd = self.module(child, f"{name}.{key}" if name else key, a)
                steps.append(bwd)

            def inner(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                for bwd in reversed(steps):
                    rp, rn = bwd(rp, rn)
                return rp, rn
        elif isinstance(m, Residual):
            x = a
            out_body, bwd_body = self.module(m.body, f"{name}.body" if name else "body", x)
            out_skip, bwd_skip = self.module(
                m.shortcut, f"{name}.shortcut" if name else "shortcut", x
            )
            a = tuple(u + v for u, v in zip(out_body, out_skip, strict=True))

            def inner(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                if self.o.residual == "even":  # evenly among the branches carrying it
                    share = [_even_share(rp, rn, mine, other)
                             for mine, other in ((out_body, out_skip), (out_skip, out_body))]
                else:  # proportional to the contributions
                    dp, dn = _stab(a[0], self.o.epsilon), _stab(a[1], self.o.epsilon)
                    share = [(rp * out[0] / dp, rn * out[1] / dn) for out in (out_body, out_skip)]
                bp, bn = bwd_body(*share[0])
                sp, sn = bwd_skip(*share[1])
                return bp + sp, bn + sn
        elif isinstance(m, nn.Linear):
            a, inner = self.linear(m, a)
        elif isinstance(m, nn.Conv2d):
            a, inner = self.conv(m, a)
        elif isinstance(m, nn.ReLU):
            a, inner = self.relu(a)
        elif isinstance(m, nn.MaxPool2d):
            a, inner = self.maxpool(m, a)
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            a, inner = self.avgpool(m, a)
        elif isinstance(m, nn.Flatten):
            shape = a[0].shape
            a = tuple(t.flatten(m.start_dim, m.end_dim) for t in a)

            def inner(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return rp.reshape(shape), rn.reshape(shape)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            def inner(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return rp, rn
        else:
            raise NotImplementedError(f"reference: {type(m).__name__} at {name!r}")

        def backward(rp: torch.Tensor, rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if name:
                self.recorded[name] = ReferenceRelevance(rp, rn)
            return inner(rp, rn)

        return a, backward


@torch.no_grad()
def reference_forward(model: nn.Module, x: torch.Tensor, **options) -> Streams:
    """The split pair's output streams ``(a(L,+), a(L,-), f(x))`` in float64."""
    streams, _ = _run(model, x, Options(**options))
    return streams[0][0], streams[0][1], streams[0][2]


def _run(model: nn.Module, x: torch.Tensor, o: Options):
    ref = _Reference(o)
    x = x.detach().double()
    if o.input_split == "relu":
        a = (torch.relu(x), torch.relu(-x), x)
    elif o.input_split == "half":
        a = (x / 2, -x / 2, x)
    else:
        raise ValueError(o.input_split)
    out, backward = ref.module(merge_batchnorm(model), "", a)
    return (out, backward), ref


@torch.no_grad()
def reference_split_lrp(
    model: nn.Module, x: torch.Tensor, seed: torch.Tensor, **options
) -> dict[str, ReferenceRelevance]:
    """SplitLRP relevance of every module output and of the input (key ``"input"``).

    ``seed`` (B, n_outputs) is the relevance of the positive output stream ``a(L,+)``; the
    negative output stream starts with zero relevance.
    """
    (out, backward), ref = _run(model, x, Options(**{"keep_parts": True, **options}))
    seed = seed.detach().double().reshape(out[0].shape)
    rp, rn = backward(seed, torch.zeros_like(seed))
    result = dict(ref.recorded)
    result["input"] = ReferenceRelevance(rp, rn)
    return result


def _even_share(rp: torch.Tensor, rn: torch.Tensor, mine: Streams,
                other: Streams) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch's part of a residual sum's relevance (``residual="even"``), per stream:
    half where both branches' values in that stream are nonzero (or both zero), all of it
    where only this branch's is, nothing where only the other's is."""
    parts = []
    for r, a, b in ((rp, mine[0], other[0]), (rn, mine[1], other[1])):
        alone, absent = (a != 0) & (b == 0), (a == 0) & (b != 0)
        parts.append(torch.where(alone, r, torch.where(absent, 0.0, r / 2)))
    return parts[0], parts[1]

