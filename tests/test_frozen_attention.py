"""``nn.MultiheadAttention`` under ``nonlinear="freeze"``: the attention weights frozen, the
value path split exactly.

Checked in float64 against torch's own module: ``g - h`` is the model's output to 1e-12, and
the input sensitivity is the gradient of the *frozen* model -- the model with the attention
weights replaced by the constant weights that torch's module returns with
``need_weights=True, average_attn_weights=False`` -- to 1e-10; also
``nn.TransformerEncoder`` (traced through), ``nn.TransformerDecoderLayer``,
``nn.TransformerDecoder`` and ``nn.Transformer`` (against a functional copy of them with the
attention weights and LayerNorm's ``1 / std`` detached) and a tiny torchvision ViT.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import core

E, HEADS, L, S, N = 8, 2, 4, 5, 3  # embedding, heads, query length, key length, batch


def frozen_attention(m: nn.MultiheadAttention, value: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The module's output with its per-head attention ``weights`` (``(N, H, L, S')``, or
    ``(H, L, S')`` unbatched, as torch returns them) held constant: an affine map of
    ``value`` (written out with einsum, in the module's sequence-first contract)."""
    unbatched = value.dim() == 2
    if unbatched:
        value, weights = value.unsqueeze(1), weights.unsqueeze(0)
    elif m.batch_first:
        value = value.transpose(0, 1)                         # (S, N, vdim)
    if m.in_proj_weight is not None:  # packed (kdim == vdim == embed_dim)
        w_v = m.in_proj_weight[2 * m.embed_dim:]
    else:
        w_v = m.v_proj_weight
    v = torch.einsum("snd,ed->sne", value, w_v)
    if m.in_proj_bias is not None:
        v = v + m.in_proj_bias[2 * m.embed_dim:]
    n = v.shape[1]
    if m.bias_v is not None:
        v = torch.cat([v, m.bias_v.expand(1, n, m.embed_dim)])
    if m.add_zero_attn:
        v = torch.cat([v, v.new_zeros(1, n, m.embed_dim)])
    v = v.reshape(v.shape[0], n, m.num_heads, m.head_dim)
    mixed = torch.einsum("nhls,snhe->lnhe", weights, v).reshape(weights.shape[2], n, -1)
    out = torch.einsum("lne,fe->lnf", mixed, m.out_proj.weight)
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias
    if unbatched:
        return out.squeeze(1)
    return out.transpose(0, 1) if m.batch_first else out


class AttentionNet(nn.Module):
    """Batch-first input ``(N, L, E)`` -> attention -> linear head -> mean over tokens.

    ``cross``: the key and value come from other input-dependent tensors (``relu(K x)``,
    ``V x``; with ``kdim``/``vdim`` their own sizes); else ``query is key is value``.
    ``options``: keyword arguments of the call (masks are buffers)."""

    def __init__(self, module: dict, options: dict, cross: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, **module)
        self.cross = cross
        self.key_in = nn.Linear(E, module.get("kdim") or E)
        self.value_in = nn.Linear(E, module.get("vdim") or E)
        self.head = nn.Linear(E, 3)
        self.flags = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}
        self.masks = [k for k, v in options.items() if isinstance(v, torch.Tensor)]
        for k in self.masks:
            self.register_buffer(k, options[k])

    def options(self) -> dict:
        return self.flags | {k: getattr(self, k) for k in self.masks}

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = x if self.attn.batch_first else x.transpose(0, 1)
        if not self.cross:
            return xs, xs, xs
        return xs, torch.relu(self.key_in(xs)), self.value_in(xs)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        y = y if self.attn.batch_first else y.transpose(0, 1)
        return self.head(y).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.inputs(x)
        return self.finish(self.attn(q, k, v, **self.options())[0])

    def frozen(self, x: torch.Tensor) -> nn.Module:
        """The frozen model at ``x``: the attention weights of torch's module held fixed."""
        with torch.no_grad():
            q, k, v = self.inputs(x)
            options = self.options() | {"need_weights": True, "average_attn_weights": False}
            _, weights = self.attn(q, k, v, **options)
        net = self

        class Frozen(nn.Module):
            def forward(self, xr: torch.Tensor) -> torch.Tensor:
                return net.finish(frozen_attention(net.attn, net.inputs(xr)[2], weights))

        return Frozen()


def _masks(cross: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    keys = S if cross else L
    padding = torch.zeros(N, keys, dtype=torch.bool)
    padding[0, -1] = padding[2, :2] = True
    causal = torch.ones(L, keys, dtype=torch.bool).triu(1)
    return {
        "padding": padding,
        "padding_float": torch.randn(N, keys, generator=g, dtype=torch.float64),
        "causal": causal,
        "float": torch.randn(L, keys, generator=g, dtype=torch.float64),
        "per_head": torch.randn(N * HEADS, L, keys, generator=g, dtype=torch.float64),
    }


_M = _masks()
CONFIGS = {
    "batch_first": ({"batch_first": True}, {}, False),
    "sequence_first": ({"batch_first": False}, {}, False),
    "no_bias": ({"batch_first": True, "bias": False}, {}, False),
    "bias_kv": ({"batch_first": True, "add_bias_kv": True}, {}, False),
    "zero_attn": ({"batch_first": False, "add_zero_attn": True}, {}, False),
    "kdim_vdim": ({"batch_first": True, "kdim": 3, "vdim": 5}, {}, True),
    "cross": ({"batch_first": False}, {}, True),
    "key_padding_bool": ({"batch_first": True}, {"key_padding_mask": _M["padding"]}, False),
    "key_padding_float": ({"batch_first": True},
                          {"key_padding_mask": _M["padding_float"]}, False),
    "attn_mask_bool": ({"batch_first": True}, {"attn_mask": _M["causal"]}, False),
    "attn_mask_float": ({"batch_first": False}, {"attn_mask": _M["float"]}, False),
    "attn_mask_per_head": ({"batch_first": True}, {"attn_mask": _M["per_head"]}, False),
    "causal_hint": ({"batch_first": True}, {"attn_mask": _M["causal"], "is_causal": True,
                                            "need_weights": False}, False),
    "need_weights_false": ({"batch_first": True}, {"need_weights": False}, False),
    "per_head_weights": ({"batch_first": True}, {"average_attn_weights": False}, False),
    "everything": ({"batch_first": False, "add_bias_kv": True, "add_zero_attn": True,
                    "kdim": 6, "vdim": 7},
                   {"key_padding_mask": _M["padding_float"], "attn_mask": _M["float"]}, True),
}


def _split(model: nn.Module, x: torch.Tensor | None = None,
           **options) -> tuple[core.SplitModel, str]:
    """The split with ``nonlinear="freeze"`` and its freeze warning (for a model captured
    by running it, ``x``: the warning comes with the first call)."""
    with pytest.warns(UserWarning, match="froze") as caught:
        sm = core.split(model, nonlinear="freeze", **options)
        if x is not None:
            sm(x)
    return sm, " ".join(str(w.message) for w in caught)


def _model(name: str) -> AttentionNet:
    module, options, cross = CONFIGS[name]
    torch.manual_seed(1)
    model = AttentionNet(module, options, cross).double().eval()
    if model.attn.bias_k is not None:
        nn.init.normal_(model.attn.bias_k)
        nn.init.normal_(model.attn.bias_v)
    if model.attn.in_proj_bias is not None:
        nn.init.normal_(model.attn.in_proj_bias, std=0.3)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_multihead_attention_is_exact_and_its_gradient_is_the_frozen_models(name):
    model = _model(name)
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm, warned = _split(model, stabilizer="none")
    assert "'attn'" in warned and "attention weights" in warned
    assert any(op.startswith("module 'attn'") for op in sm.frozen_operations())
    g, h = sm(x)
    want = model(x)
    torch.testing.assert_close(g - h, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    reference = model.frozen(x)
    torch.testing.assert_close(reference(x), want, rtol=1e-12, atol=1e-13)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference(xr)[:, 1].sum(), xr)
    for alpha in (0.0, 0.3):
        p = sm.sensitivities(x, 1, ["input"], alpha=alpha)["input"]
        torch.testing.assert_close(p.g - p.h, grad, rtol=1e-10, atol=1e-12)
        assert not p.exact
    # the true gradient also flows through the queries and keys: it differs
    xt = x.clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad(model(xt)[:, 1].sum(), xt)
    assert (true_grad - grad).abs().max() > 1e-6


def test_the_output_element_is_probed_and_the_weights_are_constants():
    model = _model("batch_first")
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm, _ = _split(model)
    p = sm.sensitivities(x, 2, ["input", "attn:0"], alpha=0.0)["attn:0"]
    assert p.exact and p.activation.shape == (N, L, E)
    with torch.no_grad():
        torch.testing.assert_close(p.activation, model.attn(x, x, x)[0], rtol=0, atol=1e-14)
    # out = mean over tokens of head(y): d out[:, 2] / d y = W_head[2] / L
    torch.testing.assert_close(p.grad, (model.head.weight[2] / L).expand(N, L, E))
    with pytest.raises(ValueError, match="'attn:0'"):
        sm.sensitivities(x, 2, ["attn"])


class _WeightsToo(nn.Module):
    """Uses the attention weights as a feature too (they are constants of the split)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E + L, 3)

    def forward(self, x):
        y, w = self.attn(x, x, x)
        return self.head(torch.cat([y, w], -1)).mean(1)


def test_the_weights_element_is_a_constant():
    torch.manual_seed(4)
    model = _WeightsToo().double().eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm, _ = _split(model)
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)


class _Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):                        # x: (L, E), one sequence
        return self.head(self.attn(x, x, x, key_padding_mask=self.kpm)[0])


def test_an_unbatched_sequence():
    torch.manual_seed(5)
    model = _Unbatched().double().eval()
    model.kpm = torch.tensor([False, False, True, False])
    x = torch.randn(L, E, dtype=torch.float64)
    sm, _ = _split(model, stabilizer="none")
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    with torch.no_grad():
        _, weights = model.attn(x, x, x, key_padding_mask=model.kpm, average_attn_weights=False)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        model.head(frozen_attention(model.attn, xr, weights))[:, 0].sum(), xr)
    p = sm.sensitivities(x, 0, ["input"], alpha=0.0)["input"]
    torch.testing.assert_close(p.g - p.h, grad, rtol=1e-10, atol=1e-12)


class _MaskArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask)[0].sum(1)


def test_a_mask_passed_to_the_model_as_a_keyword():
    torch.manual_seed(6)
    model = _MaskArgument().double().eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 0] = True
    sm, _ = _split(model)
    g, h = sm(x, key_padding_mask=kpm)
    torch.testing.assert_close(g - h, model(x, key_padding_mask=kpm), rtol=0, atol=1e-12)
    g2, h2 = sm(x)  # another mask, another graph
    torch.testing.assert_close(g2 - h2, model(x), rtol=0, atol=1e-12)
    assert not torch.allclose(g - h, g2 - h2)


class _LearnedQueries(nn.Module):
    """Attention pooling with learned queries and keys: the weights are constants."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, 2, E))
        self.keys = nn.Parameter(torch.randn(1, L, E))

    def forward(self, x):
        n = x.shape[0]
        return self.attn(self.queries.expand(n, -1, -1), self.keys.expand(n, -1, -1),
                         x)[0].flatten(1)


def test_constant_queries_and_keys_split_exactly_without_freezing():
    torch.manual_seed(7)
    model = _LearnedQueries().double().eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm = core.split(model)  # nonlinear="error": nothing is frozen
    assert sm.frozen_operations() == []
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 0].sum(), xr)
    p = sm.sensitivities(x, 0, ["input"])["input"]
    assert p.exact
    torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12)


def test_refused_without_freeze_naming_the_option():
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(_model("batch_first"))


def test_relevance_runs_and_is_conserved():
    torch.manual_seed(8)
    model = AttentionNet({"batch_first": True, "bias": False}, {}).double().eval()
    model.head = nn.Linear(E, 3, bias=False).double().eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm, _ = _split(model, stabilizer="none")
    seed = F.one_hot(torch.tensor([0, 2, 1]), 3).double() * torch.tensor([[1.0], [2.0], [0.5]])
    rel = sm.relevance(x, seed, layers=["attn:0"], epsilon=1e-9)
    for name, r in rel.items():
        assert torch.isfinite(r.pos).all() and torch.isfinite(r.neg).all()
        total = (r.pos + r.neg).flatten(1).sum(1)
        torch.testing.assert_close(total, seed.sum(1), rtol=1e-6, atol=0, msg=name)


# --------------------------------------------------------------------------- models
def _encoder(norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, activation="relu",
                                       batch_first=True, norm_first=norm_first)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(E * L, 3))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder(norm_first):
    torch.manual_seed(9)
    model = _encoder(norm_first).double().eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    sm, warned = _split(model, x)
    assert "MultiheadAttention" in warned
    listed = " ".join(sm.frozen_operations(x))
    assert "0.layers.1.self_attn" in listed and "0.layers.1.norm2" in listed
    g, h = sm(x)
    with torch.no_grad():
        want = model(x)  # torch's fast path of the encoder layers
    torch.testing.assert_close(g - h, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    p = sm.sensitivities(x, 1, ["input", "0.layers.0.self_attn:0"])
    assert all(torch.isfinite(q.g).all() for q in p.values())
    rel = sm.relevance(x, F.one_hot(torch.tensor([0, 1, 2]), 3).double())
    assert torch.isfinite(rel["input"].comb).all()


# --------------------------------------------------------------------------- decoders
# A functional copy of torch's transformer layers (batch-first, float masks) with the
# attention weights softmax(q k^T / sqrt(e) + mask) and LayerNorm's 1 / std detached: the
# frozen model, whose autograd gradient the input sensitivity g - h must equal.
def _frozen_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    inverse = (centred.square().mean(-1, keepdim=True) + m.eps).rsqrt().detach()
    return centred * inverse * m.weight + m.bias


def _frozen_attention(m: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    b_q, b_k, b_v = m.in_proj_bias.chunk(3)

    def heads(t: torch.Tensor) -> torch.Tensor:            # (N, T, E) -> (N, H, T, E / H)
        return t.unflatten(-1, (m.num_heads, m.head_dim)).transpose(1, 2)

    scores = heads(q @ w_q.T + b_q) @ heads(kv @ w_k.T + b_k).transpose(-1, -2)
    scores = scores / m.head_dim ** 0.5 + (0 if mask is None else mask)
    weights = scores.softmax(-1).detach()
    mixed = (weights @ heads(kv @ w_v.T + b_v)).transpose(1, 2).flatten(2)
    return m.out_proj(mixed)


def _frozen_encoder_layer(m: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    def sa(t: torch.Tensor) -> torch.Tensor:
        return _frozen_attention(m.self_attn, t, t, None)

    def ff(t: torch.Tensor) -> torch.Tensor:
        return m.linear2(m.activation(m.linear1(t)))

    if m.norm_first:
        x = x + sa(_frozen_norm(m.norm1, x))
        return x + ff(_frozen_norm(m.norm2, x))
    x = _frozen_norm(m.norm1, x + sa(x))
    return _frozen_norm(m.norm2, x + ff(x))


def _frozen_decoder_layer(m: nn.TransformerDecoderLayer, x: torch.Tensor,
                          memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    def sa(t: torch.Tensor) -> torch.Tensor:
        return _frozen_attention(m.self_attn, t, t, mask)

    def ca(t: torch.Tensor) -> torch.Tensor:
        return _frozen_attention(m.multihead_attn, t, memory, None)

    def ff(t: torch.Tensor) -> torch.Tensor:
        return m.linear2(m.activation(m.linear1(t)))

    if m.norm_first:
        x = x + sa(_frozen_norm(m.norm1, x))
        x = x + ca(_frozen_norm(m.norm2, x))
        return x + ff(_frozen_norm(m.norm3, x))
    x = _frozen_norm(m.norm1, x + sa(x))
    x = _frozen_norm(m.norm2, x + ca(x))
    return _frozen_norm(m.norm3, x + ff(x))


def _frozen_stack(stack: nn.TransformerEncoder | nn.TransformerDecoder, x: torch.Tensor,
                  *memory_and_mask: torch.Tensor | None) -> torch.Tensor:
    for layer in stack.layers:
        if isinstance(layer, nn.TransformerDecoderLayer):
            x = _frozen_decoder_layer(layer, x, *memory_and_mask)
        else:
            x = _frozen_encoder_layer(layer, x)
    return x if stack.norm is None else _frozen_norm(stack.norm, x)


def _causal(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


class _DecoderNet(nn.Module):
    """``x (N, S, E)``: memory ``relu(W x)`` (or a TransformerEncoder of ``x``), target
    ``V x[:, :L]``; a decoder layer (or a TransformerDecoder with a causal target mask),
    then a linear head and the mean over tokens."""

    def __init__(self, norm_first: bool, layers: int | None = None) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.stacked = layers is not None
        if self.stacked:
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, batch_first=True), 1,
                enable_nested_tensor=False)
            self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(E))
            self.register_buffer("mask", _causal(L))
        else:
            self.memory = nn.Linear(E, E)
            self.decoder = layer
        self.target = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target(x[:, :L]), (None if self.stacked else torch.relu(self.memory(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tgt, memory = self.parts(x)
        if self.stacked:
            return self.head(self.decoder(tgt, self.encoder(x), tgt_mask=self.mask)).mean(1)
        return self.head(self.decoder(tgt, memory)).mean(1)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        tgt, memory = self.parts(x)
        if self.stacked:
            y = _frozen_stack(self.decoder, tgt, _frozen_stack(self.encoder, x), self.mask)
        else:
            y = _frozen_decoder_layer(self.decoder, tgt, memory, None)
        return self.head(y).mean(1)


def _check_frozen_gradient(sm: core.SplitModel, inputs: tuple[torch.Tensor, ...],
                           frozen: Callable[..., torch.Tensor], target: int) -> None:
    """The input sensitivities' g - h against autograd through the frozen copy."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(frozen(*leaves)[:, target].sum(), leaves)
    probes = sm.sensitivities(inputs if len(inputs) > 1 else inputs[0], target, ["input"],
                              alpha=0.3)["input"]
    probes = probes if isinstance(probes, tuple) else (probes,)
    assert len(probes) == len(inputs)
    for p, grad in zip(probes, grads, strict=True):
        assert torch.isfinite(p.g).all() and torch.isfinite(p.h).all() and not p.exact
        torch.testing.assert_close(p.g - p.h, grad, rtol=1e-10, atol=1e-12)
        assert grad.abs().max() > 1e-3  # the input reaches the output through the frozen model


def _check_output(g: torch.Tensor, h: torch.Tensor, want: torch.Tensor) -> None:
    assert want.abs().min() > 1e-3
    torch.testing.assert_close(g - h, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer(norm_first):
    """Was 'TransformerDecoderLayer is not piecewise linear or has no split-pair rule'."""
    torch.manual_seed(12)
    model = _DecoderNet(norm_first).double().eval()
    x = torch.randn(N, S, E, dtype=torch.float64)
    sm, warned = _split(model, x)
    listed = " ".join(sm.frozen_operations(x))
    assert "'decoder.self_attn'" in listed and "'decoder.multihead_attn'" in listed
    assert "'decoder.norm3'" in listed
    g, h = sm(x)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(model.frozen(x), want, rtol=1e-12, atol=1e-14)
    _check_output(g, h, want)
    _check_frozen_gradient(sm, (x,), model.frozen, 1)
    p = sm.sensitivities(x, 2, ["decoder.multihead_attn:0", "decoder"])
    assert all(torch.isfinite(q.g).all() for q in p.values())
    with pytest.raises(core.SeveralInputsError, match="'decoder:input'"):  # tgt and memory
        sm.sensitivities(x, 2, ["decoder:input"])
    rel = sm.relevance(x, F.one_hot(torch.tensor([0, 1, 2]), 3).double())
    assert torch.isfinite(rel["input"].comb).all()


def test_transformer_decoder_with_a_causal_mask_and_an_encoder():
    """Two decoder layers (and the decoder's final LayerNorm) on the memory of a
    TransformerEncoder of the same input, the target masked causally
    (``generate_square_subsequent_mask``; torch detects it and passes ``is_causal``)."""
    torch.manual_seed(13)
    model = _DecoderNet(False, layers=2).double().eval()
    x = torch.randn(N, S, E, dtype=torch.float64)
    sm, warned = _split(model, x)
    listed = " ".join(sm.frozen_operations(x))
    for name in ("encoder.layers.0.self_attn", "decoder.layers.1.self_attn",
                 "decoder.layers.1.multihead_attn", "decoder.norm'"):
        assert name in listed
    g, h = sm(x)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(model.frozen(x), want, rtol=1e-12, atol=1e-14)
    _check_output(g, h, want)
    _check_frozen_gradient(sm, (x,), model.frozen, 0)
    # the mask matters: without it the output differs
    with torch.no_grad():
        unmasked = model.head(model.decoder(model.parts(x)[0], model.encoder(x))).mean(1)
    assert (unmasked - want).abs().max() > 1e-3


class _Seq2Seq(nn.Module):
    """``forward(src, tgt)`` through ``nn.Transformer`` with a causal target mask made in
    the forward; two tensor inputs, each split."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(E, HEADS, 1, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = _causal(tgt.shape[1]).to(tgt.dtype)
        return self.head(self.transformer(src, tgt, tgt_mask=mask)).mean(1)

    def frozen(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        memory = _frozen_stack(t.encoder, src)
        return self.head(_frozen_stack(t.decoder, tgt, memory, _causal(tgt.shape[1]))).mean(1)


def test_transformer_with_two_inputs():
    """Was 'Transformer is not piecewise linear or has no split-pair rule'."""
    torch.manual_seed(14)
    model = _Seq2Seq().double().eval()
    src = torch.randn(N, S, E, dtype=torch.float64)
    tgt = torch.randn(N, L, E, dtype=torch.float64)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze")
        g, h = sm((src, tgt))
    listed = " ".join(sm.frozen_operations((src, tgt)))
    assert "transformer.encoder.layers.0.self_attn" in listed
    assert "transformer.decoder.layers.1.multihead_attn" in listed
    with torch.no_grad():
        want = model(src, tgt)
        torch.testing.assert_close(model.frozen(src, tgt), want, rtol=1e-12, atol=1e-14)
    _check_output(g, h, want)
    _check_frozen_gradient(sm, (src, tgt), model.frozen, 2)
    p = sm.sensitivities((src, tgt), 1, ["input:1", "transformer.encoder"])
    assert p["input:1"].g.shape == tgt.shape
    assert torch.isfinite(p["transformer.encoder"].g).all()
    # SplitLRP: one relevance per input (was refused, 'one node per name')
    rel = sm.relevance((src, tgt), torch.ones_like(want), ["input:1"])
    assert [r.pos.shape for r in rel["input"]] == [src.shape, tgt.shape]
    assert all(torch.isfinite(r.comb).all() and r.comb.abs().sum() > 0 for r in rel["input"])
    assert torch.equal(rel["input:1"].comb, rel["input"][1].comb)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_stacks_are_recorded_once(kind):
    """TransformerEncoder and TransformerDecoder read ``tgt.is_nested`` (torch's
    ``_get_seq_len``), a layout fixed by the input's signature: the recorded graph is kept
    for the next call (it was recorded again at every call, as for a value read as a
    number)."""
    torch.manual_seed(15)
    model = (_encoder(False) if kind == "encoder" else _DecoderNet(False, layers=1)).double()
    x = torch.randn(N, L if kind == "encoder" else S, E, dtype=torch.float64)
    sm, _ = _split(model.eval(), x)
    assert sm.capture.cached == 1
    y = torch.randn_like(x)
    g, h = sm(y)
    assert sm.capture.cached == 1
    with torch.no_grad():
        torch.testing.assert_close(g - h, model(y), rtol=1e-12, atol=1e-12)


def test_transformer_decoder_refused_without_freeze():
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(_DecoderNet(False).double().eval())


def test_tiny_torchvision_vit():
    torch.manual_seed(10)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5).double().eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    nn.init.normal_(model.heads.head.bias)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sm, warned = _split(model)
    assert "self_attention" in " ".join(sm.frozen_operations())
    g, h = sm(x)
    want = model(x)
    assert want.abs().min() > 1e-3
    torch.testing.assert_close(g - h, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    p = sm.sensitivities(x, 3, ["input"])["input"]
    assert torch.isfinite(p.g).all() and not p.exact


def test_the_users_model_is_unchanged():
    model = _model("everything")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(N, L, E, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model, nonlinear="freeze")
    sm.sensitivities(x, 0, ["input"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["batch_first", "need_weights_false", "bias_kv", "vit"])
def test_float32_output_is_the_modules_bit_for_bit(name):
    """The d stream is the module's own output by the path a call with gradients takes (it
    was torch's fused inference path, which rounds differently in float32): the attention
    output, and a ViT's logits, are the model's bit for bit."""
    if name == "vit":
        torch.manual_seed(11)
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16,
            mlp_dim=32, num_classes=5).eval()
        nn.init.normal_(model.heads.head.weight)
        x = torch.randn(2, 3, 32, 32)
    else:
        model = _model(name).float()
        x = torch.randn(N, L, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model, nonlinear="freeze")
    if name == "vit":
        assert torch.equal(sm.forward_pairs(x).d, model(x))
    else:
        p = sm.sensitivities(x, 0, ["attn:0"])["attn:0"]
        assert torch.equal(p.activation, model.attn(x, x, x, **model.options())[0])
