"""Graph conversion and layer rules of the split (issue 2, items 1-3).

Every model here is checked for the forward invariant ``g - h == model(x)`` under every
stabiliser and for the sensitivity invariants against autograd of a copy of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from tests.core_checks import (
    MAXPOOLS,
    assert_rel_close,
    check_float64_exact,
    check_forward,
    check_nonnegative_streams,
    check_sensitivities,
    max_abs,
    randomise_batchnorm,
)


def _check(model: nn.Module, x: torch.Tensor, layers, target=None, maxpools=("convex",),
           alphas=(0.0, 0.4, 0.5), **options) -> None:
    model.eval()
    f = check_forward(model, x, maxpools=maxpools, **options)
    if target is None:
        target = torch.arange(x.shape[0]) % f.shape[1]
    for maxpool in maxpools:
        check_sensitivities(model, x, target, layers, alphas=alphas, maxpool=maxpool, **options)


# --------------------------------------------------------------------------- functional ops
class FunctionalNet(nn.Module):
    """Functional ReLUs, clamp, in-place add, sub, constants, dropout and size-based pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.register_buffer("gain", torch.linspace(-1.5, 2.0, 8).view(1, 8, 1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        b = self.conv2(a)
        b += a  # in-place residual add
        b = torch.relu(b)
        c = self.conv3(b).clamp(min=0)
        c = torch.clamp(c - 0.25 * b, min=0.0)  # sub and a scalar product
        c = c * self.gain - a / 3 + 0.5  # tensor constant, division, constant offset
        c = -c
        c = F.dropout(c, p=0.5, training=self.training)
        c = F.avg_pool2d(c, c.size()[3])  # x.size()-dependent pooling
        c = c.view(c.size(0), -1)
        return self.fc(c)


def test_functional_ops_inplace_add_and_size_dependent_pooling():
    torch.manual_seed(0)
    _check(FunctionalNet(), torch.randn(2, 3, 8, 8),
           ["conv1", "conv2", "conv3", "fc", "input", "fc:input"])


class ShortcutNet(nn.Module):
    """ResNet-20's option-A shortcut: slicing and zero channel padding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0)
        out = F.relu(self.bn(self.conv(x)) + short)
        return self.fc(torch.flatten(out, 1))


def test_slicing_and_zero_padding_shortcut():
    torch.manual_seed(1)
    _check(randomise_batchnorm(ShortcutNet()), torch.randn(3, 3, 8, 8),
           ["stem", "bn", "fc:input", "input"])


class ShapeNet(nn.Module):
    """view / flatten / reshape / permute / cat / channel shuffle / mean over dims."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 + 8 + 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = self.shuffle(F.relu(self.c(y)))
        y = torch.channel_shuffle(y, 4)
        m1 = y.mean((2, 3))
        m2 = torch.mean(y.permute(0, 2, 3, 1), dim=(1, 2)).reshape(n, -1)
        m3 = y.flatten(2).sum(-1)[:, :6] / (h * w)
        return self.fc(torch.cat((m1 - m2 * 0.5, m2, m3), 1))


def test_view_permute_cat_channel_shuffle_mean():
    torch.manual_seed(2)
    _check(ShapeNet(), torch.randn(2, 3, 6, 6), ["a", "c", "shuffle", "fc:input", "input"])


class ChunkNet(nn.Module):
    """Multi-output ops (chunk, split), stack, unsqueeze/squeeze, constant cat."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.fc1(x)).chunk(2, dim=1)
        p, q = torch.split(F.leaky_relu(a - b, 0.2), 2, dim=1)
        s = torch.stack([p, q], dim=0).sum(0)
        s = s.unsqueeze(-1).squeeze(-1)
        t = torch.cat([s, torch.ones_like(s) * -2, a], dim=1)
        return self.fc2(t)


def test_chunk_split_stack_and_constant_cat():
    torch.manual_seed(3)
    _check(ChunkNet(), torch.randn(4, 6), ["fc1", "fc2:input", "input"])


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 7))
                                    for _ in range(3))
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = torch.add(x, block(x), alpha=0.5)
            x = F.relu6(x) - 1.0
        return self.out(self.drop(x))


def test_residual_adds_through_module_list_and_containers():
    torch.manual_seed(4)
    _check(ResidualMLP(), torch.randn(3, 5) * 3,
           ["blocks.0", "blocks.1.1", "blocks.2", "drop", "out:input", "input"])


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("dims,opts", [
    (1, dict(stride=2, padding=1, dilation=1, groups=1, bias=True)),
    (1, dict(stride=1, padding=3, dilation=2, groups=3, bias=False)),
    (2, dict(stride=1, padding=1, dilation=1, groups=1, bias=True)),
    (2, dict(stride=2, padding=2, dilation=2, groups=3, bias=True)),
    (2, dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=1, bias=False)),
    (2, dict(stride=1, padding="same", dilation=1, groups=3, bias=True)),  # depthwise
    (3, dict(stride=2, padding=1, dilation=1, groups=3, bias=True)),
    (2, dict(stride=1, padding=1, dilation=1, groups=1, bias=True, padding_mode="reflect")),
    (1, dict(stride=2, padding=2, dilation=1, groups=3, bias=True, padding_mode="circular")),
    (3, dict(stride=1, padding=1, dilation=1, groups=1, bias=False, padding_mode="replicate")),
])
def test_conv_layers(dims, opts):
    torch.manual_seed(5)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    model = nn.Sequential(
        conv(3, 6, 3, **opts), bn(6), nn.ReLU(),
        conv(6, 6, 3, padding=1, groups=3), nn.ReLU(),
        pool(1), nn.Flatten(), nn.Linear(6, 4),
    )
    x = torch.randn((2, 3) + (7,) * dims)
    _check(randomise_batchnorm(model), x, ["0", "1", "2", "3", "7", "input"])


def test_linear_without_bias_and_batchnorm1d():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(),
                          nn.Linear(8, 3, bias=False))
    _check(randomise_batchnorm(model), torch.randn(4, 5), ["1", "2", "4", "6", "input"])


def _prelu(n: int) -> nn.PReLU:
    act = nn.PReLU(n)
    with torch.no_grad():  # learned slopes of either sign, some steeper than 1
        act.weight.copy_(torch.linspace(-0.8, 1.6, n))
    return act


@pytest.mark.parametrize("act", [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.LeakyReLU(-0.5), nn.Hardtanh(-1.0, 2.0),
    _prelu(16), _prelu(1), nn.RReLU(0.1, 0.4), nn.Threshold(0.3, 0.3), nn.Softshrink(0.4),
], ids=lambda act: repr(act))
def test_relu_type_units(act):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 16), copy.deepcopy(act),
                          nn.Linear(16, 3))
    x = torch.randn(5, 4) * 4  # reach both kinks of ReLU6 / Hardtanh
    _check(model, x, ["0", "1", "3", "input"])
    z = model[0](x)
    assert (z > 6).any() and (z < 0).any()


class PiecewiseLinearFunctions(nn.Module):
    """The functional forms: per-channel PReLU (function and tensor method), RReLU in eval,
    softshrink, and a SyncBatchNorm (eval statistics, as BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.SyncBatchNorm(6)
        self.slope = nn.Parameter(torch.linspace(-0.5, 1.5, 6))
        self.slope1 = nn.Parameter(torch.tensor([0.3]))
        self.fc = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.prelu(self.bn(self.conv(x)), self.slope)
        y = F.rrelu(y, 0.05, 0.25, training=self.training)
        y = F.softshrink(y.prelu(self.slope1), 0.2)
        return self.fc(y.flatten(1))


def test_piecewise_linear_functions_and_sync_batchnorm():
    torch.manual_seed(3)
    model = randomise_batchnorm(PiecewiseLinearFunctions())
    x = torch.randn(3, 3, 5, 5) * 2
    _check(model, x, ["bn", "conv", "fc:input", "input"])
    _check(model, x, ["bn", "fc:input", "input"], merge_batchnorm=True)
    merged = core.split(model, merge_batchnorm=True, stabilizer="none").pairs(x, ["bn"])["bn"]
    plain = core.split(model, stabilizer="none").pairs(x, ["bn"])["bn"]
    assert (merged.s < plain.s - 1e-4).any()  # merged into the convolution: less mass
    sm = core.split(model)
    nodes = [n.target for n in sm.capture.symbolic.graph.nodes]
    assert F.prelu in nodes and "prelu" in nodes and F.softshrink in nodes


def test_prelu_with_an_activation_as_slope_is_refused():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.prelu(self.fc(x), x.mean().reshape(1))

    with pytest.raises(core.UnsupportedOperation, match="prelu"):
        core.split(Gated())(torch.randn(2, 4))


def test_merge_batchnorm_changes_mass_only():
    torch.manual_seed(8)
    model = randomise_batchnorm(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    ).eval())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.bias.mul_(20)  # the bias of the merged map can cancel: |k b + beta|
    x = torch.randn(2, 3, 6, 6)
    _check(model, x, ["1", "4", "8", "input"], merge_batchnorm=True)
    layers = ["1", "4", "8"]
    plain = core.split(model, stabilizer="none").pairs(x, layers)
    merged = core.split(model, stabilizer="none", merge_batchnorm=True).pairs(x, layers)
    for layer in layers:
        torch.testing.assert_close(merged[layer].d, plain[layer].d, rtol=0, atol=0)
        # |k b + beta| <= k |b| + |beta|: merging never adds mass, and removes some here
        assert (merged[layer].s <= plain[layer].s * (1 + 1e-6) + 1e-6).all(), layer
        assert (merged[layer].s < plain[layer].s - 1e-3).any(), layer
    sens = [core.split(model, merge_batchnorm=m).sensitivities(x, 1, ["input", "4"], 0.3)
            for m in (False, True)]
    for layer in ("input", "4"):
        a, b = sens[0][layer], sens[1][layer]
        assert_rel_close(b.S, a.S, 1e-6, what=f"S at {layer}")
        assert_rel_close(b.Dg, a.Dg, 1e-6, what=f"Dg at {layer}")



def test_merge_batchnorm_refuses_a_linear_on_sequences():
    """BatchNorm1d after a Linear on (batch, length, features) normalises dim 1, not the
    Linear's features: merging them gave a pair with ``s < |d|`` (one stream negative) when
    the sizes agreed and a raw shape error when they did not."""
    torch.manual_seed(0)
    for features in (4, 5):
        model = randomise_batchnorm(nn.Sequential(
            nn.Linear(6, features), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(features, 3)).eval())
        with torch.no_grad():
            model[0].bias.mul_(20)
        x = torch.randn(2, 4, 6)
        g, h = core.split(model)(x)
        assert_rel_close(g - h, model(x), 1e-5, what="g - h")
        with pytest.raises(core.UnsupportedOperation, match="merge_batchnorm"):
            core.split(model, merge_batchnorm=True)(x)
    flat = randomise_batchnorm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).eval())
    core.split(flat, merge_batchnorm=True)(torch.randn(2, 6))  # (batch, features): merged

# --------------------------------------------------------------------------- pooling
def _pool_net(pool: nn.Module, channels: int = 4, size: int = 9) -> nn.Sequential:
    with torch.no_grad():
        out = pool(torch.zeros(1, channels, size, size))
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), pool,
                         nn.Conv2d(channels, 4, 1), nn.Flatten(),
                         nn.Linear(out[0, :1].numel() * 4, 3))


POOLS = [
    nn.MaxPool2d(3, stride=2, padding=1),  # ResNet's stem: overlapping windows and padding
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, ceil_mode=True),  # partial windows at the border
    nn.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    nn.MaxPool2d(2, stride=3, padding=1, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    nn.AdaptiveAvgPool2d((4, 3)),  # uneven windows
    nn.AdaptiveMaxPool2d(3),
]


@pytest.mark.parametrize("pool", POOLS, ids=[repr(p) for p in POOLS])
def test_pooling(pool):
    torch.manual_seed(9)
    model = _pool_net(pool)
    _check(model, torch.randn(2, 3, 9, 9), ["1", "2", "3", "input"], maxpools=MAXPOOLS)


def _explicit_max_pool(pos, neg, pool: nn.MaxPool2d, mode: str):
    """The pooled pair, float64, from explicit windows (section 3.4 for "convex")."""
    k, s = pool.kernel_size, pool.stride
    k, s = (k, k) if isinstance(k, int) else k, (s, s) if isinstance(s, int) else s
    p, dil = pool.padding, pool.dilation
    p, dil = (p, p) if isinstance(p, int) else p, (dil, dil) if isinstance(dil, int) else dil
    d = pos - neg
    out = F.max_pool2d(d, k, s, p, dil, pool.ceil_mode)
    oh, ow = out.shape[-2:]
    g, h = torch.zeros_like(out), torch.zeros_like(out)
    H, W = d.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            rows = [i * s[0] - p[0] + a * dil[0] for a in range(k[0])]
            cols = [j * s[1] - p[1] + b * dil[1] for b in range(k[1])]
            idx = [(r, c) for r in rows for c in cols if 0 <= r < H and 0 <= c < W]
            dp = torch.stack([pos[..., r, c] for r, c in idx], -1)
            dn = torch.stack([neg[..., r, c] for r, c in idx], -1)
            if mode == "convex":  # max_i (p_i - n_i) + sum_j n_j, and sum_j n_j
                g[..., i, j] = (dp - dn).amax(-1) + dn.sum(-1)
                h[..., i, j] = dn.sum(-1)
            else:  # the pair at the first position of the largest activation
                win = (dp - dn).argmax(-1, keepdim=True)
                g[..., i, j] = dp.gather(-1, win)[..., 0]
                h[..., i, j] = dn.gather(-1, win)[..., 0]
    return g, h


@pytest.mark.parametrize("mode", MAXPOOLS)
@pytest.mark.parametrize("pool", [p for p in POOLS if isinstance(p, nn.MaxPool2d)],
                         ids=[repr(p) for p in POOLS if isinstance(p, nn.MaxPool2d)])
def test_max_pooling_pair_matches_explicit_windows(pool, mode):
    torch.manual_seed(10)
    model = _pool_net(pool).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    pairs = core.split(model, maxpool=mode, stabilizer="none").pairs(x, ["2:input", "2"])
    g, h = _explicit_max_pool(pairs["2:input"].pos, pairs["2:input"].neg, pool, mode)
    torch.testing.assert_close(pairs["2"].pos, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairs["2"].neg, h, rtol=1e-12, atol=1e-12)


def test_functional_max_pool_and_1d_3d_pooling():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, padding=1)
            self.c3 = nn.Conv3d(2, 3, 3, padding=1)
            self.fc = nn.Linear(4 * 17 + 3 * 8, 3)

        def forward(self, x1: torch.Tensor) -> torch.Tensor:
            x3 = x1.view(x1.shape[0], 2, 4, 4, 4)
            a = F.max_pool1d(F.relu(self.c1(x1)), 5, 4, 2, ceil_mode=True)
            b = F.max_pool3d(F.relu(self.c3(x3)), 3, stride=2, padding=1)
            b = F.adaptive_max_pool3d(b, 2) + F.avg_pool3d(b, 1)
            return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))

    torch.manual_seed(11)
    _check(Net(), torch.randn(2, 2, 64), ["c1", "c3", "fc:input", "input"], maxpools=MAXPOOLS)


def test_stabilizers_bound_the_mass_after_relu_units():
    torch.manual_seed(12)
    layers = [nn.Linear(8, 64), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 3)).eval()
    x = torch.randn(2, 8) * 5
    relus = [str(i) for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    free = core.split(model, stabilizer="none").pairs(x, relus)
    assert max_abs(free[relus[-1]].s) > 1e3  # the streams grow without a stabiliser
    for mode in ("scale", "shift"):
        pairs = core.split(model, stabilizer=mode).pairs(x, relus)
        for name in relus:
            s = pairs[name].s
            assert float(s.max()) / 2 <= 10.0 + 1e-4, (mode, name, float(s.max()))
            torch.testing.assert_close(pairs[name].d, free[name].d, rtol=0, atol=0)


class LikeNet(nn.Module):
    """Constants shaped like an activation (``zeros_like``, ``new_full``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.fc1(x))
        a = a + torch.full_like(a, -0.5) - x.new_ones(a.shape) + torch.zeros_like(a)
        return self.fc2(a.clamp(min=0))


def test_constant_like_ops_are_constants():
    # regression: `torch.ones_like(activation)` was rejected as an unsupported operation
    torch.manual_seed(13)
    _check(LikeNet(), torch.randn(3, 4), ["fc1", "fc2:input", "input"])
    p = core.split(LikeNet().eval(), stabilizer="none").pairs(torch.randn(2, 4), ["fc2:input"])
    assert (p["fc2:input"].neg >= 0).all()


class InPlaceAliases(nn.Module):
    """In-place ops whose effect is seen through another name (eager aliasing)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        keep = out
        out.add_(self.b(x))  # result not assigned: `keep` sees the sum
        keep.mul_(-2.0)  # and `out` sees the product
        F.relu(out, inplace=True)  # `keep` is rectified too
        h = self.act(self.mid(keep))
        return self.out(keep + h)


def test_in_place_ops_follow_eager_aliasing():
    # regression: later uses of `out` after `out.add_(...)` saw the value before the write
    torch.manual_seed(14)
    _check(InPlaceAliases(), torch.randn(4, 4) * 2, ["a", "mid", "act", "out:input", "input"])


def test_in_place_after_a_long_chain_of_operations():
    # a number computed from a size and bumped in place is not an activation; finding that
    # out walks back through the graph, which must not recurse once per node (a 3000-node
    # chain of functions would exceed Python's recursion limit)
    class LongChain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.size(1)
            n += 1
            x = self.a(x)
            for _ in range(3000):
                x = torch.relu(x - 0.001)
            x += 1
            return x * n

    torch.manual_seed(3)
    model, x = LongChain().eval().double(), torch.randn(3, 4, dtype=torch.float64)
    g, h = core.split(model)(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-10)


def test_in_place_write_into_a_view_is_rejected():
    class ViewWrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.a(x)
            flat = out.view(-1)
            out.relu_()
            return flat.view(2, -1) + out[:, :2].relu_().sum()

    sm = core.split(ViewWrite().eval())  # tracing refuses: the recording is tried
    with pytest.raises(core.UnsupportedOperation, match="`add` reads .* written in place"):
        sm(torch.randn(2, 4))  # was raised in `+` and turned by torch into a plain TypeError


class SliceWrites(nn.Module):
    """In-place methods on slices: of a copy of a parameter (torchvision's Swin V2 zeroes a
    third of its bias so) and of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.b.bias.clone()
        bias[1:2].zero_()
        z = F.relu(self.a(x)).clone()
        z[:, :2].mul_(-2.0)
        z[:, 4].clamp_(max=0.3)
        return F.linear(z, self.b.weight, bias) + z[:, :2].sum(1, keepdim=True)


def test_in_place_methods_on_slices_split_exactly():
    """Was refused ('writes in place into a view ... aliasing'); now recorded as the
    method on a copy of the slice assigned into its base."""
    torch.manual_seed(8)
    model = SliceWrites().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    sm = core.split(model)
    check_float64_exact(sm, model, x, 2, grad_rtol=1e-10)
    model.b.bias.data.add_(1.0)  # read at every call, not a constant of the recording
    check_float64_exact(sm, model, x, 2, grad_rtol=1e-10)


class DecoderNet(nn.Module):
    """Transposed convolutions, upsampling, pixel shuffle and unflatten (decoder-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.shuffle = nn.PixelShuffle(2)
        self.unflat = nn.Unflatten(1, (4, 6))
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.relu(self.enc(x))
        u = F.relu(self.up1(e))
        u = self.up2(u) + F.interpolate(u, scale_factor=2, mode="nearest")
        u = self.shuffle(F.adaptive_avg_pool2d(u, (2, 3)))
        v = self.unflat(u.flatten(1)[:, :24])
        return self.fc(v.flatten(1))


def test_transposed_conv_upsampling_pixel_shuffle():
    torch.manual_seed(15)
    _check(DecoderNet(), torch.randn(2, 3, 8, 8), ["enc", "up1", "up2", "shuffle", "input"])


class OutputSizeNet(nn.Module):
    """A transposed convolution told its output size (a U-Net's skip connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(F.relu(self.down(x)), output_size=x.shape[-2:])  # 8x8, not 7x7
        return self.fc(F.relu(u + x).flatten(1))


def test_transposed_conv_output_size_is_kept():
    """The forward's output_size was ignored: a 7x7 map where the model has 8x8."""
    torch.manual_seed(18)
    _check(OutputSizeNet(), torch.randn(2, 3, 8, 8), ["down", "up", "input"])


class FloorDivNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.div(F.relu(x), 0.5, rounding_mode="floor").sum(1, keepdim=True)


def test_division_with_rounding_is_refused():
    """floor(x / c) is piecewise constant: its split would not be monotone and convex."""
    with pytest.raises(core.UnsupportedOperation, match="rounding_mode='floor'"):
        core.split(FloorDivNet().eval())(torch.randn(2, 3))


class BicubicNet(nn.Module):
    """Bicubic interpolation (negative weights) by module and by function, with and without
    antialiasing and corner alignment."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bicubic")
        self.fc = nn.Linear(4 * 5 * 3 + 4 * 7 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        u = torch.relu(self.up(a) - 0.1)
        down = F.interpolate(u, size=(5, 3), mode="bicubic", antialias=True)
        side = F.interpolate(a, size=(7, 9), mode="bicubic", align_corners=True)
        return self.fc(torch.cat([down.flatten(1), side.flatten(1)], 1))


def test_bicubic_interpolation_splits_with_absolute_separable_weights():
    torch.manual_seed(17)
    model = BicubicNet().double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    _check(model, x, ["conv", "up", "input"])
    check_nonnegative_streams(model.eval(), x)  # |P| keeps the streams' terms non-negative


def test_uneven_adaptive_max_pooling_needs_wta():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d((3, 2)),
                          nn.Flatten(), nn.Linear(24, 3)).eval()
    x = torch.randn(2, 3, 7, 7)
    with pytest.raises(core.UnsupportedOperation, match=r"uneven windows.*maxpool='wta'"):
        core.split(model)(x)
    _check(model, x, ["2", "input"], maxpools=("wta",))


def test_one_split_serves_several_input_sizes():
    # the traced graph keeps x.size()-dependent arguments dynamic
    torch.manual_seed(17)
    model = FunctionalNet().eval()
    sm = core.split(model)
    for side in (6, 8, 13):
        x = torch.randn(2, 3, side, side)
        g, h = sm(x)
        with torch.no_grad():
            f = model(x)
        assert_rel_close(g - h, f, 1e-5, scale=max_abs(g), what=f"side {side}")


class AugmentedAssignment(nn.Module):
    """``x += y`` writes into the tensor that another name still refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        skip = out
        out += self.b(F.relu(out))  # `skip` sees the sum in eager mode
        out *= 0.5
        n = x.size(1)
        m = n
        n += 1  # a Python number: rebinding, no aliasing
        return self.out(F.relu(skip) + out[:, :m].sum(1, keepdim=True) / n)


def test_augmented_assignment_follows_eager_aliasing():
    # regression: fx traced `out += y` as `out = out + y`, so `skip` kept the old value
    torch.manual_seed(18)
    _check(AugmentedAssignment(), torch.randn(3, 3), ["a", "b", "out:input", "input"])


def test_tensor_unfold_windows_split_exactly():
    """``Tensor.unfold`` (sliding blocks, as in halo attention) copies elements: structural."""

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 2 * 4 * 2, 4)

        def forward(self, x):
            z = torch.relu(self.conv(x))          # (B, 3, 4, 4)
            w = z.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, 3, 2, 2, 2, 2) non-overlapping blocks
            w = w.unfold(4, 1, 1)                  # overlapping (size 1, step 1) windows
            return self.fc(w.flatten(1)[:, : 3 * 2 * 4 * 2])

    torch.manual_seed(0)
    model = Blocks().double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    check_float64_exact(core.split(model), model, x, 1, grad_rtol=0)


def test_repeat_interleave_and_tile_split_exactly():
    """``repeat_interleave`` (GCViT's global query) and ``tile`` copy elements: structural."""

    class Copies(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 2 * 4 * 4 + 3 * 4 * 8 + 3 * 4 * 4 * 2, 4)

        def forward(self, x):
            z = torch.relu(self.conv(x))                  # (B, 3, 4, 4)
            a = z.repeat_interleave(2, dim=1)             # method
            b = torch.repeat_interleave(z, 2, dim=3)      # function
            c = torch.tile(z, (1, 1, 2)) + z.tile((1, 2, 1)).flip(2)[:, :, :4].repeat(1, 1, 1, 2)
            return self.fc(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], 1))

    torch.manual_seed(0)
    model = Copies().double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    check_float64_exact(core.split(model), model, x, 1, grad_rtol=0)


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_amax_over_channels_splits_exactly(maxpool):
    """``x.amax(dim=1, keepdim=True)`` (CBAM-style spatial attention, timm's CSATv2) and
    ``torch.amax`` over several dimensions: max pooling over whole dimensions."""

    class ChannelMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.fc = nn.Linear(16 + 4 + 3, 3)

        def forward(self, x):
            z = self.conv(x)                          # signed: the split has mass in both streams
            a = z.amax(dim=1, keepdim=True)           # (B, 1, 4, 4)
            b = torch.amax(torch.relu(z), dim=(2, 3))  # (B, 4)
            c = z[:, :3].amax(-1).amax(-1, keepdim=False)  # (B, 3)
            return self.fc(torch.cat([a.flatten(1), b, c], 1))

    torch.manual_seed(0)
    model = ChannelMax().double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sm = core.split(model, maxpool=maxpool)
    check_float64_exact(sm, model, x, 1, grad_rtol=0)


def test_the_traced_twin_shares_parameters_and_copies_buffers_and_tensor_attributes():
    from core.twin import module_twin

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
            self.also = [self.body[0]]  # a module held outside _modules
            self.scale = torch.ones(3)  # a plain tensor attribute

    model = Odd()
    twin = module_twin(model)
    assert twin is not model and twin.body is not model.body
    assert twin.body[0].weight is model.body[0].weight
    assert twin.also[0] is twin.body[0]
    bn, twin_bn = model.body[1], twin.body[1]
    assert twin_bn.running_mean is not bn.running_mean
    assert torch.equal(twin_bn.running_mean, bn.running_mean)
    twin_bn.running_mean += 1
    twin.scale += 1
    twin.training = False
    twin.body[0].register_forward_hook(lambda *a: None)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(model.scale, torch.ones(3))
    assert model.training and not model.body[0]._forward_hooks


def test_the_traced_twin_goes_with_the_capture(monkeypatch):
    """The copy of the module tree that torch.fx traced (and its copies of the buffers) is
    freed when tracing ends, without waiting for the garbage collector (fx's trace leaves
    its tracer in a reference cycle)."""
    import gc
    import weakref

    import core.graph

    twins = []
    make_twin = core.graph.module_twin

    def kept_twin(*args, **kwargs):
        twin = make_twin(*args, **kwargs)
        twins.append(weakref.ref(twin))
        return twin

    monkeypatch.setattr(core.graph, "module_twin", kept_twin)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    enabled = gc.isenabled()
    gc.disable()
    try:
        sm = core.split(model, reuse_capture=False)
        assert len(twins) == 1 and twins[0]() is None
    finally:
        if enabled:
            gc.enable()
    x = torch.rand(2, 1, 4, 4)
    g, h = sm(x)
    assert_rel_close(g - h, model(x).detach(), 1e-6)


def test_traced_nodes_match_torch_fx():
    """The split's tracer (made without fx's argument walk) records the graph that
    torch.fx's own tracer records: names, operations, arguments, keywords and users."""
    import torch.fx as fx

    from core.graph import _SplitTracer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x, scale: float = 2.0):
            y = F.relu(self.conv(x), inplace=False)
            z = torch.cat([y, x.mean(dim=1, keepdim=True)], dim=1) * scale
            return self.pool(z).flatten(start_dim=1).sum(-1)

    def described(graph):
        def name(a):
            return fx.node.map_arg(a, lambda n: n.name)
        return [(n.name, n.op, str(n.target), name(n.args), name(n.kwargs),
                 sorted(u.name for u in n.users)) for n in graph.nodes]

    model = Net().eval()
    ours = described(_SplitTracer().trace(model))
    assert ours == described(fx.Tracer().trace(model))
    assert any(kw for *_, kw, _ in ours)  # keywords were recorded


def test_unfold_and_fold_split_exactly():
    """``nn.Unfold``/``F.unfold`` (im2col: copies, as in TNT and VOLO) and ``nn.Fold``/
    ``F.fold`` (col2im: sums of overlapping patches) are positive linear maps."""

    class Patches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.unfold = nn.Unfold(2, stride=1)            # overlapping 2x2 patches
            self.fold = nn.Fold((4, 4), 2, stride=1)
            self.fc = nn.Linear(12 * 9 + 3 * 16 + 3 * 16, 4)

        def forward(self, x):
            z = self.conv(x)                                 # signed
            cols = self.unfold(torch.relu(z))                # (B, 12, 9)
            back = self.fold(cols)                           # (B, 3, 4, 4), overlaps summed
            other = F.fold(F.unfold(z, 2, stride=2), (4, 4), 2, stride=2)  # an exact round trip
            return self.fc(torch.cat([cols.flatten(1), back.flatten(1), other.flatten(1)], 1))

    torch.manual_seed(0)
    model = Patches().double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sm = core.split(model)
    check_float64_exact(sm, model, x, 1, layers=["input", "unfold"])


def test_max_with_a_dimension_splits_its_values_and_keeps_the_indices():
    """``x.max(1)[0]`` (VOLO's auxiliary head), ``.values``/``.indices`` and ``x.max()``."""

    class MaxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 15)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            z = self.a(x).view(-1, 3, 5)            # signed tokens
            top = z.max(1)                          # (values, indices)
            assert top.indices.dtype == torch.long
            return self.fc(top[0] + 0.5 * torch.max(z, dim=1, keepdim=True).values[:, 0]
                           + z.max())

    torch.manual_seed(4)
    model = MaxHead().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    sm = core.split(model)
    check_float64_exact(sm, model, x, 0)


def test_max_fields_in_a_traced_graph():
    """The same through torch.fx's symbolic trace: ``getattr(result, "values")`` nodes."""

    class Fields(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 15)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            z = self.a(x).view(-1, 3, 5)
            top = z.max(1)
            return self.fc(top[0] + top.values + 0.5 * torch.max(z, dim=1).values)

    torch.manual_seed(5)
    model = Fields().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    sm = core.split(model)
    assert sm.capture.symbolic is not None
    check_float64_exact(sm, model, x, 0)


class Maxout(nn.Module):
    """Elementwise max and min of activations: a maxout unit of two branches, LeakyReLU as
    ``max(z, 0.2 z)``, ``min`` with a constant tensor, ``torch.max(a, b)``, and min
    reductions (``x.min(dim)`` with its indices, ``amin``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(4, 12)
        self.register_buffer("cap", torch.linspace(-0.5, 1.5, 12))
        self.fc = nn.Linear(12 + 4 + 1, 3)

    def forward(self, x):
        z = torch.maximum(self.a(x), self.b(x))
        z = torch.max(z, 0.2 * z)
        z = torch.minimum(z, self.cap).minimum(torch.relu(z) + 0.3)
        rows = z.view(-1, 4, 3)
        low = rows.min(2)
        return self.fc(torch.cat([z, low.values + 0 * low.indices, rows.amin((1, 2)).unsqueeze(1)],
                                 1))


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_elementwise_max_and_min_of_activations(maxpool):
    torch.manual_seed(9)
    model = Maxout().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64) * 2
    sm = core.split(model, maxpool=maxpool)
    assert sm.capture.symbolic is not None
    check_float64_exact(sm, model, x, 1)
    _check(model.float(), x.float(), ["a", "b", "fc:input", "input"], maxpools=(maxpool,))
    if maxpool == "convex":
        check_nonnegative_streams(model.float(), x.float())


def test_cumulative_sums():
    """``cumsum`` (function and method) is a positive linear map: ``s' = cumsum(s)``."""

    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            z = torch.relu(self.a(x))
            return self.fc(torch.cumsum(z, dim=1) - z.flip(1).cumsum(1))

    torch.manual_seed(10)
    model = Cumulative().double().eval()
    check_float64_exact(core.split(model), model, torch.randn(4, 4, dtype=torch.float64), 1)
    _check(model.float(), torch.randn(4, 4), ["a", "fc:input", "input"])


class ChannelClamp(nn.Module):
    """``clamp`` with per-channel bounds (buffers), ``clamp_min`` with a tensor bound."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4 * 9, 3)
        self.register_buffer("lo", torch.linspace(-1.0, 0.0, 4).view(4, 1, 1))
        self.register_buffer("hi", torch.linspace(0.2, 1.5, 4).view(4, 1, 1))

    def forward(self, x):
        z = self.conv(x).clamp(min=self.lo, max=self.hi)
        return self.fc(torch.clamp_min(z, self.lo / 2).flatten(1))


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_clamp_with_per_channel_bounds(maxpool):
    torch.manual_seed(16)
    model = ChannelClamp().double().eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64) * 2
    check_float64_exact(core.split(model, maxpool=maxpool), model, x, 2)
    _check(model.float(), x.float(), ["conv", "fc:input", "input"], maxpools=(maxpool,))


def test_clamp_with_an_activation_as_bound_is_refused():
    class Bound(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x).clamp(min=x)

    with pytest.raises(core.UnsupportedOperation, match="torch.maximum"):
        core.split(Bound())(torch.randn(2, 4))


class SegNetBlock(nn.Module):
    """SegNet's encoder-decoder: max pooling that returns its indices, max unpooling with
    them (module and function), adaptive max pooling with indices."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.fc = nn.Linear(3 * 4 + 4, 2)

    def forward(self, x):
        z, where = self.pool(torch.relu(self.enc(x)))
        y = torch.relu(self.mid(z))
        up = self.unpool(y, where) + F.max_unpool2d(z, where, 2, output_size=x.shape[-2:])
        top, _ = F.adaptive_max_pool2d(torch.relu(self.dec(up)), 2, return_indices=True)
        return self.fc(torch.cat([top.flatten(1), F.max_pool2d(y, 4).flatten(1)], 1))


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_max_unpooling_with_the_pooling_indices(maxpool):
    torch.manual_seed(17)
    model = SegNetBlock().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    check_float64_exact(core.split(model, maxpool=maxpool), model, x, 1)
    _check(model.float(), x.float(), ["enc", "mid", "dec", "input"], maxpools=(maxpool,))


class DeepResidual(nn.Module):
    """A residual block with torchvision's stochastic depth (EfficientNet, ConvNeXt)."""

    def __init__(self, training_flag: bool | None = None) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.drop = StochasticDepth(0.5, "row")
        self.fc = nn.Linear(32, 3)
        self.training_flag = training_flag

    def forward(self, x):
        from torchvision.ops import stochastic_depth

        y = F.relu(self.conv(x))
        if self.training_flag is None:
            y = self.drop(y)
        else:
            y = stochastic_depth(y, 0.5, "row", self.training_flag)
        return self.fc((x + y).flatten(1))


def test_stochastic_depth_is_the_identity_with_eval_semantics():
    """torchvision's stochastic_depth is a call in traced graphs (torch.fx.wrap); the rule
    table knows it by its qualified name (without importing torchvision): the identity in
    eval mode, refused when the forward asks for training mode."""
    torch.manual_seed(3)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    model = DeepResidual().double().train()  # explained with eval semantics
    sm = core.split(model)
    assert sm.capture.symbolic is not None
    targets = [n.target for n in sm.capture.symbolic.graph.nodes if n.op == "call_function"]
    assert any(getattr(t, "__name__", "") == "stochastic_depth" for t in targets)
    model.eval()
    check_float64_exact(sm, model, x, 1, grad_rtol=0)
    with pytest.raises(core.UnsupportedOperation, match="draws random numbers"):
        core.split(DeepResidual(training_flag=True).double())


def _pooled_relu(x: torch.Tensor) -> torch.Tensor:
    """Piecewise linear, but one call in traced graphs (torch.fx.wrap below)."""
    return F.max_pool2d(F.relu(x), 2) - 0.5 * F.relu(-x).mean((2, 3), keepdim=True)


torch.fx.wrap("_pooled_relu")


class UsesWrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(_pooled_relu(self.conv(x)).flatten(1))


def test_a_function_that_tracing_keeps_as_one_call_is_recorded_operation_by_operation():
    """torch.fx.wrap keeps a function as one call_function node, which no rule knows (was:
    'has no split-pair rule'); the eager recording sees the operations inside it."""
    torch.manual_seed(4)
    model = UsesWrapped().double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert any(n.target is _pooled_relu for n in torch.fx.symbolic_trace(model).graph.nodes)
    sm = core.split(model)
    assert "torch.fx.wrap" in str(sm.capture.symbolic_error)
    check_float64_exact(sm, model, x, 1, grad_rtol=1e-10)


def test_torchvision_swin_splits_under_freeze():
    """torchvision's Swin wraps shifted_window_attention with torch.fx.wrap."""
    import torchvision

    torch.manual_seed(5)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1],
                                      num_heads=[1, 2], window_size=[2, 2],
                                      num_classes=5).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze")
        g, h = sm(x)
    with torch.no_grad():
        f = model(x)
    assert_rel_close(g - h, f, 1e-12, scale=max_abs(g))


class Noisy(nn.Module):
    """Forwards that are random with eval semantics."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.how = how

    def forward(self, x, flag: bool = False):
        if self.how == "randn":
            x = x + 0.1 * torch.randn(x.shape)
        elif self.how == "bernoulli":
            x = x * torch.bernoulli(torch.full_like(x, 0.5))
        elif self.how == "dropout-default":
            x = F.dropout(x, 0.2)  # training=True is the functional default
        else:
            x = F.dropout(x, 0.2, self.training)
        return self.fc(F.relu(x))


@pytest.mark.parametrize("flag", [False, True])  # symbolic, eager capture
@pytest.mark.parametrize("how", ["randn", "bernoulli", "dropout-default"])
def test_a_forward_that_draws_random_numbers_is_refused(how, flag):
    """The split would equal one draw and model(x) another; functional dropout with its
    default training=True drops in eval mode too (it was the identity: g - h missed
    model(x) by the dropped elements)."""
    model = Noisy(how).eval()
    x = torch.randn(2, 4)
    match = "training=True" if how == "dropout-default" else "draws random numbers"
    with pytest.raises(core.UnsupportedOperation, match=match):
        sm = core.split(model)
        sm(x, *((flag,) if flag else ()))


def test_functional_dropout_with_the_training_flag_is_the_identity():
    model = Noisy("dropout-flag").double().train()
    sm = core.split(model)
    check_float64_exact(sm, model.eval(), torch.randn(2, 4, dtype=torch.float64), 1, grad_rtol=0)


class ItemValue(nn.Module):
    """A forward that reads a tensor value as a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(x) * x.abs().max().item())


def test_a_value_read_with_item_is_a_constant_of_each_call():
    """``x.max().item()`` is a number of each call (the model is linear in x for that
    number): the forward is recorded at every call (it was refused: no rule for item)."""
    torch.manual_seed(4)
    model = ItemValue().double().eval()
    sm = core.split(model)
    assert sm.capture.symbolic is None and "item" in str(sm.capture.symbolic_error)
    for scale in (1.0, 3.0):
        x = scale * torch.randn(3, 4, dtype=torch.float64)
        g, h = sm(x)
        torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
        probe = sm.sensitivities(x, 1, ["input"])["input"]
        c = x.abs().max().item()
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.fc(F.relu(xr) * c)[:, 1].sum(), xr)
        torch.testing.assert_close(probe.grad, grad, rtol=1e-12, atol=1e-12)


class StackedResidual(nn.Module):
    """A residual block whose add is written as Zennit's canonizers write it:
    ``torch.stack([identity, out], -1).sum(-1)`` (``how="stack"``), or as ``a + b``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 4)
        self.how = how

    def forward(self, x, scale: float = 1.0):
        out = F.relu(self.conv(x)) * scale
        if self.how == "stack":
            out = torch.stack([x, out], dim=-1).sum(dim=-1)
        elif self.how == "stack3":  # three summands: left as a sum over the stack
            out = torch.sum(torch.stack([x, out, out], dim=-1), dim=-1)
        else:
            out = x + out
        return self.head(F.relu(out).flatten(1))


@pytest.mark.parametrize("kwargs", [{}, {"scale": 1.0}], ids=["traced", "recorded"])
def test_a_sum_over_a_stack_of_two_is_an_add(kwargs):
    """``sum(stack([a, b], d), d)`` is planned as ``a + b`` (bit for bit the same value):
    SplitLRP's residual rule applies (a canonizer does not change the relevance), g - h is
    the model's output; three summands are left as they are."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    seed = torch.eye(4, dtype=torch.float64)[[1, 2]]
    models = {how: StackedResidual(how).double().eval() for how in ("add", "stack", "stack3")}
    models["stack"].load_state_dict(models["add"].state_dict())
    models["stack3"].load_state_dict(models["add"].state_dict())
    rel = {}
    for how, model in models.items():
        sm = core.split(model)
        g, h = sm(x, **kwargs)
        assert torch.allclose(g - h, model(x, **kwargs), rtol=0, atol=1e-12)
        rel[how] = sm.relevance(x, seed, kwargs=kwargs)["input"].comb
        graph = sm.prepare(x, (), kwargs).captured.graph
        targets = {n.target for n in graph.nodes if n.op != "placeholder"}
        assert (torch.sum in targets or "sum" in targets) == (how == "stack3")
    assert torch.equal(rel["stack"], rel["add"])
