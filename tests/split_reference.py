"""Slow, explicit reference of the split pair (paper sections 3.1, 3.4, F.3), float64.

The four-product split network is built literally: ``W = W+ - W-``, ``z+ = W+ a+ + W- a-
+ b+``, ``z- = W- a+ + W+ a- + b-``, Maxout in the g stream, identity in the h stream; the
shifted local sensitivities follow the recursion of appendix F.3 (eqs. 36-41, 58-59).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_input(x: torch.Tensor, mode: str = "relu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x+, x-)`` with the "relu" or "half" input split."""
    if mode == "relu":
        return F.relu(x), F.relu(-x)
    return x / 2, -x / 2


def mlp_forward(layers, x, mode="relu"):
    """Explicit split forward of an MLP ``[(W, b), ...]`` with ReLU between layers.

    Returns the list of ``(a+, a-)`` per activation (input first, logits last) and the
    Maxout masks ``m+ = 1{z+ >= z-}`` of every layer (ones at the logits).
    """
    ap, an = split_input(x, mode)
    acts, masks = [(ap, an)], []
    for i, (w, b) in enumerate(layers):
        wp, wn = F.relu(w), F.relu(-w)
        bp, bn = F.relu(b), F.relu(-b)
        zp = ap @ wp.T + an @ wn.T + bp
        zn = ap @ wn.T + an @ wp.T + bn
        if i < len(layers) - 1:
            m = (zp >= zn).to(x.dtype)
            ap, an = torch.maximum(zp, zn), zn
        else:
            m = torch.ones_like(zp)
            ap, an = zp, zn
        masks.append(m)
        acts.append((ap, an))
    return acts, masks


def mlp_sensitivities(layers, x, target, alpha, mode="relu"):
    """Shifted local sensitivities ``(d+g, d-g, d+h, d-h)`` per activation, by eqs. 36-41.

    ``alpha`` is a float or a list with one value per activation (input first).
    """
    acts, masks = mlp_forward(layers, x, mode)
    n_act = len(acts)
    alphas = [alpha] * n_act if isinstance(alpha, (int, float)) else list(alpha)
    onehot = F.one_hot(target, acts[-1][0].shape[1]).to(x.dtype)
    zero = torch.zeros_like(onehot)
    streams = {"g": [onehot, zero], "h": [zero, onehot]}

    def shift(pair, a):
        s = a * (pair[0] + pair[1])
        return [pair[0] - s, pair[1] - s]

    for k in streams:
        streams[k] = shift(streams[k], alphas[-1])
    out = [None] * n_act
    out[-1] = (*streams["g"], *streams["h"])
    for l in range(n_act - 2, -1, -1):
        w = layers[l][0]
        wp, wn = F.relu(w), F.relu(-w)
        mp = masks[l]
        mn = 1 - mp
        for k in streams:
            dp, dn = streams[k]
            new_p = (dp * mp) @ wp + (dp * mn) @ wn + dn @ wn
            new_n = (dp * mp) @ wn + (dp * mn) @ wp + dn @ wp
            streams[k] = shift([new_p, new_n], alphas[l])
        out[l] = (*streams["g"], *streams["h"])
    return acts, out


def convex_maxpool(ap, an, k):
    """Section 3.4: ``a+' = max_j {a+_j + sum_{i != j} a-_i}``, ``a-' = sum_i a-_i``."""
    b, c, h, w = ap.shape
    up = F.unfold(ap, k, stride=k).view(b, c, k * k, -1)
    un = F.unfold(an, k, stride=k).view(b, c, k * k, -1)
    total = un.sum(2, keepdim=True)
    pos = (up + total - un).amax(2)
    neg = total.squeeze(2)
    return pos.view(b, c, h // k, w // k), neg.view(b, c, h // k, w // k)


def conv_split(ap, an, conv):
    """The four-product split of a Conv2d."""
    w, b = conv.weight, conv.bias
    wp, wn = F.relu(w), F.relu(-w)
    opts = dict(stride=conv.stride, padding=conv.padding)
    bp = None if b is None else F.relu(b)
    bn = None if b is None else F.relu(-b)
    zp = F.conv2d(ap, wp, bp, **opts) + F.conv2d(an, wn, None, **opts)
    zn = F.conv2d(ap, wn, bn, **opts) + F.conv2d(an, wp, None, **opts)
    return zp, zn


def linear_split(ap, an, lin):
    """The four-product split of a Linear."""
    w, b = lin.weight, lin.bias
    wp, wn = F.relu(w), F.relu(-w)
    return ap @ wp.T + an @ wn.T + F.relu(b), ap @ wn.T + an @ wp.T + F.relu(-b)


def maxout(zp, zn):
    """g stream Maxout, h stream identity."""
    return torch.maximum(zp, zn), zn
