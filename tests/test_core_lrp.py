"""SplitLRP in the core: conservation, stream bookkeeping, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Linear(6 * 4 * 4, 4, bias=False)

    def forward(self, x):
        y = self.conv1(x)
        y = F.relu(y + self.body(y))
        y = torch.cat([y[:, :3], y[:, 3:]], 1)
        return self.head(self.pool(y).flatten(1))


@pytest.mark.parametrize("maxpool", ["wta", "convex"])
@pytest.mark.parametrize("stabilizer", ["scale", "none"])
@pytest.mark.parametrize("activation_rule", ["pass", "wta"])
def test_relevance_is_conserved_at_every_layer(maxpool, stabilizer, activation_rule):
    torch.manual_seed(0)
    model = _Res().eval()
    x = torch.randn(3, 3, 8, 8)
    seed = F.one_hot(torch.tensor([0, 3, 1]), 4).float() * torch.tensor([[1.0], [2.0], [0.5]])
    sm = core.split(model, maxpool=maxpool, stabilizer=stabilizer, threshold=1.0)
    rel = sm.relevance(x, seed, layers=["conv1", "pool", "head"],
                       activation_rule=activation_rule)
    for name, r in rel.items():
        total = (r.pos + r.neg).flatten(1).sum(1)
        torch.testing.assert_close(total, seed.sum(1), rtol=1e-4, atol=0, msg=name)
        assert torch.isfinite(r.comb).all()
    assert torch.equal(rel["head"].pos, seed) and not rel["head"].neg.any()


def test_relevance_options_and_bad_input():
    model = _Res().eval()
    sm = core.split(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="seed must be a tensor shaped like the output"):
        sm.relevance(x, torch.ones(1, 5))
    with pytest.raises(ValueError, match="activation_rule"):
        sm.relevance(x, torch.ones(1, 4), activation_rule="max")
    r = sm.relevance(x, torch.ones(1, 4))["input"]
    assert torch.equal(r.stream("comb"), r.pos - r.neg)
    with pytest.raises(ValueError, match="stream"):
        r.stream("both")
    # one name as a string (was read as its characters: 'layer 'p' is not a module')
    one = sm.relevance(x, torch.ones(1, 4), "pool")["pool"]
    torch.testing.assert_close(one.pos, sm.relevance(x, torch.ones(1, 4), ["pool"])["pool"].pos)


def test_merged_batchnorm_layer_reports_the_merged_output():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2, bias=False)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    sm = core.split(model, merge_batchnorm=True)
    x = torch.randn(2, 2, 6, 6)
    seed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rel = sm.relevance(x, seed, layers=["0", "1"])
    torch.testing.assert_close(rel["0"].pos, rel["1"].pos)
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=1e-5, atol=1e-5)


class _FieldHead(nn.Module):
    def __init__(self, field: bool) -> None:
        super().__init__()
        self.field = field
        self.a, self.fc = nn.Linear(4, 15), nn.Linear(5, 3)

    def forward(self, x):
        top = self.a(x).view(-1, 3, 5).max(1)
        return self.fc(top.values if self.field else top[0])


def test_relevance_through_a_field_of_a_structured_result():
    """``x.max(1).values`` passes relevance as ``x.max(1)[0]`` does (it raised before)."""
    torch.manual_seed(2)
    field, index = _FieldHead(True).eval(), _FieldHead(False).eval()
    index.load_state_dict(field.state_dict())
    x = torch.randn(5, 4)
    seed = F.one_hot(torch.tensor([1] * 5), 3).float()
    got = core.split(field).relevance(x, seed, layers=["input", "a"])
    want = core.split(index).relevance(x, seed, layers=["input", "a"])
    for layer in ("input", "a"):
        assert torch.equal(got[layer].pos, want[layer].pos)
        assert torch.equal(got[layer].neg, want[layer].neg)
    assert got["a"].pos.abs().sum() > 0


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_relevance_through_elementwise_max_and_min(maxpool):
    from tests.test_core_graph import Maxout

    torch.manual_seed(3)
    model = Maxout().eval()
    x = torch.randn(5, 4)
    seed = F.one_hot(torch.tensor([2] * 5), 3).float()
    r = core.split(model, maxpool=maxpool).relevance(x, seed, layers=["input", "a", "b"])
    for layer in ("input", "a", "b"):
        assert torch.isfinite(r[layer].pos).all() and torch.isfinite(r[layer].neg).all()
    assert (r["a"].pos.abs().sum() + r["b"].pos.abs().sum()) > 0


class _Pieces(nn.Module):
    """The same function written with tuples of pieces or with one concatenation."""

    def __init__(self, pieces: bool) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.a, self.b, self.fc = nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(8, 3)
        self.pieces = pieces

    def forward(self, x):
        y, z = F.relu(self.a(x)), F.relu(self.b(x))
        if self.pieces:
            chunks = y.chunk(3, 1) + (z,)  # two sequences concatenated
            return self.fc(torch.cat(chunks, 1))
        return self.fc(torch.cat([y, z], 1))


def test_relevance_through_tuples_of_pieces_equals_the_concatenation():
    """Relevance reaches every piece of a tuple built by chunk and tuple concatenation (it
    was a raw AttributeError in the split, then an autograd error in SplitLRP)."""
    x = torch.randn(4, 6, dtype=torch.float64)
    seed = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 1]]
    want = core.split(_Pieces(False).double()).relevance(x, seed, layers=["a", "b"])
    model = _Pieces(True).double()
    sm = core.split(model)
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    got = sm.relevance(x, seed, layers=["a", "b"])
    for name in ("input", "a", "b"):
        torch.testing.assert_close(got[name].pos, want[name].pos, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name].neg, want[name].neg, rtol=1e-12, atol=1e-14)


class _AddMM(nn.Module):
    """``beta c + alpha A(x) @ B(x)`` for one sample (``x`` of shape ``(1, 4)``): ``A(x)`` of
    shape ``(1, 3)``, ``B(x)`` of shape ``(3, 2)``, ``c`` a constant bias, an activation
    ``C(x)``, or (``constant_b``) ``B`` a constant matrix; as ``torch.addmm`` or written out
    (``c + A @ B``)."""

    def __init__(self, written_out: bool, addend: str = "bias", constant_b: bool = False,
                 beta: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.written_out, self.addend, self.constant_b = written_out, addend, constant_b
        self.beta, self.alpha = beta, alpha
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 6)
        self.c = nn.Linear(4, 2)
        self.w = nn.Parameter(torch.randn(3, 2))
        self.bias = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = self.w if self.constant_b else torch.relu(self.b(x)).view(3, 2)
        c = self.bias if self.addend == "bias" else self.c(x)
        if self.written_out:
            return self.beta * c + self.alpha * (a @ b)
        return torch.addmm(c, a, b, beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("case", [
    {}, {"beta": -0.5, "alpha": 2.0}, {"addend": "activation"},
    {"addend": "activation", "constant_b": True}])
def test_addmm_relevance_is_that_of_the_sum_written_out(case):
    """Was the plain epsilon rule: where both matrices are activations each got the full
    relevance of the product (twice that of ``c + A @ B``); the added ``c`` keeps its
    epsilon share and a constant matrix takes none (no halving). epsilon 0 and the
    proportional residual rule: the written-out sum then applies the same ratios."""
    torch.manual_seed(3)
    models = [_AddMM(out, **case).double().eval() for out in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(1, 4, dtype=torch.float64)
    seed = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    layers = ["a"] + ["b"] * (not case.get("constant_b", False)) + ["c"] * ("addend" in case)
    _assert_same_relevance(models, x, seed, layers, epsilon=0.0, rtol=1e-12, atol=1e-12)


def _assert_same_relevance(models: list[nn.Module], x: torch.Tensor, seed: torch.Tensor,
                           layers: list[str], epsilon: float, rtol: float,
                           atol: float) -> None:
    """SplitLRP (proportional residual) of the two models agrees at the input and at
    ``layers`` in both streams, and is not zero."""
    rel = [core.split(m).relevance(x, seed, layers=layers, epsilon=epsilon,
                                   residual="proportional") for m in models]
    for name in ("input", *layers):
        for stream in ("pos", "neg"):
            got, want = rel[0][name].stream(stream), rel[1][name].stream(stream)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)
    assert rel[0]["input"].comb.abs().max() > 1e-3


class _AddCMul(nn.Module):
    """``C + v * A(x) * B(x)``, as ``torch.addcmul`` or written out; ``C`` a constant or an
    activation, ``B`` an activation or a constant."""

    def __init__(self, written_out: bool, addend: str = "bias", constant_b: bool = False,
                 value: float = 1.0) -> None:
        super().__init__()
        self.written_out, self.addend, self.constant_b = written_out, addend, constant_b
        self.value = value
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)  # no ReLU: epsilon 0 would divide by its zero units
        b = self.w if self.constant_b else self.b(x)
        c = self.bias if self.addend == "bias" else self.c(x)
        if self.written_out:
            return c + self.value * (a * b)
        return torch.addcmul(c, a, b, value=self.value)


@pytest.mark.parametrize("case", [
    {}, {"value": -1.5}, {"addend": "activation"},
    {"addend": "activation", "constant_b": True}])
def test_addcmul_relevance_is_that_of_the_sum_written_out(case):
    """Was the plain epsilon rule (each factor got the full relevance of the product). A
    tiny epsilon (the written-out sum applies it twice: 1e-9 apart)."""
    torch.manual_seed(4)
    models = [_AddCMul(out, **case).double().eval() for out in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 4, dtype=torch.float64)
    seed = torch.tensor([[1.0, -0.5, 0.3], [0.2, 1.0, -1.0]], dtype=torch.float64)
    layers = ["a"] + ["b"] * (not case.get("constant_b", False)) + ["c"] * ("addend" in case)
    _assert_same_relevance(models, x, seed, layers, epsilon=1e-9, rtol=1e-6, atol=1e-9)


class _TwoInputs(nn.Module):
    """``x1`` (4 features) and ``x2`` (3 features) meeting in a sum of two ReLU branches, a
    product of the branches or a concatenation; called as ``model(x1, x2)`` or, ``joined``,
    as ``model(cat([x1, x2], 1))`` and split back by slicing inside the forward."""

    def __init__(self, meet: str, joined: bool = False, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.meet, self.joined = meet, joined
        self.a, self.b = nn.Linear(4, 5, bias=bias), nn.Linear(3, 5, bias=bias)
        self.fc = nn.Linear(10 if meet == "cat" else 5, 3, bias=bias)

    def forward(self, x1, x2=None):
        if self.joined:
            x1, x2 = x1[:, :4], x1[:, 4:]
        y, z = F.relu(self.a(x1)), F.relu(self.b(x2))
        if self.meet == "sum":
            return self.fc(y + z)
        if self.meet == "product":
            return self.fc(y * z)
        return self.fc(torch.cat([y, z], 1))


def _two_inputs(rows: int = 5):
    torch.manual_seed(22)
    x1, x2 = torch.randn(rows, 4, dtype=torch.float64), torch.randn(rows, 3, dtype=torch.float64)
    seed = torch.eye(3, dtype=torch.float64)[torch.arange(rows) % 3] * torch.linspace(
        0.5, 2.0, rows, dtype=torch.float64).view(-1, 1)
    return x1, x2, seed


@pytest.mark.parametrize("meet", ["sum", "product", "cat"])
@pytest.mark.parametrize("residual", ["even", "proportional"])
@pytest.mark.parametrize("activation_rule", ["pass", "wta"])
def test_relevance_of_two_inputs_equals_that_of_one_joined_input(meet, residual,
                                                                 activation_rule):
    """``sm.relevance((x1, x2), ...)`` gives one relevance per input, those of the same model
    fed one concatenated input and slicing it (it was refused: 'one node per name')."""
    x1, x2, seed = _two_inputs()
    model = _TwoInputs(meet).double().eval()
    joined = _TwoInputs(meet, joined=True).double().eval()
    joined.load_state_dict(model.state_dict())
    options = {"residual": residual, "activation_rule": activation_rule}
    got = core.split(model).relevance((x1, x2), seed, layers=["input:1", "a", "fc"], **options)
    want = core.split(joined).relevance(torch.cat([x1, x2], 1), seed, layers=["a", "fc"],
                                        **options)
    assert isinstance(got["input"], tuple) and len(got["input"]) == 2
    for r, part in zip(got["input"], want["input"].pos.split([4, 3], 1), strict=True):
        assert r.pos.shape == part.shape
    for stream in ("pos", "neg"):
        whole = getattr(want["input"], stream)
        for r, part in zip(got["input"], whole.split([4, 3], 1), strict=True):
            torch.testing.assert_close(getattr(r, stream), part, rtol=0, atol=1e-12)
        for layer in ("a", "fc"):
            torch.testing.assert_close(getattr(got[layer], stream), getattr(want[layer], stream),
                                       rtol=0, atol=1e-12)
        assert torch.equal(getattr(got["input:1"], stream), getattr(got["input"][1], stream))
    assert got["input"][1].pos.abs().sum() > 0 and got["input"][0].pos.abs().sum() > 0


@pytest.mark.parametrize("meet", ["sum", "product", "cat"])
def test_relevance_of_two_inputs_is_conserved_over_both(meet):
    """In a bias-free model the relevances of both inputs summed equal the seed, up to
    epsilon (as at every layer of one input). The ReLU rule "wta" and the residual rule
    "proportional" keep it where a stream's pre-activation is 0 (x1 has 4 features only)."""
    x1, x2, seed = _two_inputs()
    sm = core.split(_TwoInputs(meet, bias=False).double().eval())
    rel = sm.relevance((x1, x2), seed, layers=["input:0", "input:1", "a"],
                       activation_rule="wta", residual="proportional")
    total = sum((r.pos + r.neg).sum(1) for r in rel["input"])
    torch.testing.assert_close(total, seed.sum(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        (rel["input:0"].pos + rel["input:0"].neg).sum(1)
        + (rel["input:1"].pos + rel["input:1"].neg).sum(1), seed.sum(1), rtol=1e-4, atol=0)


def test_relevance_refuses_inputs_with_fewer_rows():
    """An input shared by the batch would gather the relevance of every row: refused."""
    x1, x2, seed = _two_inputs()
    sm = core.split(_TwoInputs("sum").double().eval())
    with pytest.raises(ValueError, match="input 1 has 1 rows and input 0 has 5") as err:
        sm.relevance((x1, x2[:1]), seed)
    assert "\n" not in str(err.value)


def test_the_same_tensor_as_two_inputs_is_two_inputs():
    """``(x, x)`` is split as ``(x, x.clone())``: relevance and sensitivities of each input
    (all went to the last one: the capture bound both to one placeholder)."""
    model = _TwoInputs("sum").double().eval()
    model.b = nn.Linear(4, 5).double()  # x2 of 4 features, as x1
    x, _, seed = _two_inputs()
    sm = core.split(model)
    got = sm.relevance((x, x), seed)["input"]
    want = sm.relevance((x, x.clone()), seed)["input"]
    for r, w in zip(got, want, strict=True):
        assert torch.equal(r.pos, w.pos) and torch.equal(r.neg, w.neg)
    assert got[0].pos.abs().sum() > 0
    p = sm.sensitivities((x, x), 0, ["input"], alpha=0.5)["input"]
    q = sm.sensitivities((x, x.clone()), 0, ["input"], alpha=0.5)["input"]
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(p, q, strict=True))
    assert p[0].grad.abs().sum() > 0


class _ZeroShortcut(nn.Module):
    """``fc(join(y + relu(body(y))))``, ``y = relu(inp(x))``: fed ``x >= 0``, the units of
    ``inp`` with non-negative weights have a zero negative stream (``z- = W- x+ = 0``), so the
    shortcut ``y`` carries no ``a-`` there while the body branch does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.inp = nn.Linear(5, 6, bias=False)
        self.act = nn.ReLU()
        self.body = nn.Linear(6, 6, bias=False)
        self.act2 = nn.ReLU()
        self.join = nn.Identity()
        self.fc = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            self.inp.weight[:3].abs_()

    def forward(self, x):
        y = self.act(self.inp(x))
        return self.fc(self.join(y + self.act2(self.body(y))))


@pytest.mark.parametrize("stabilizer", ["scale", "none"])
def test_even_residual_shares_among_the_branches_that_carry_the_stream(stabilizer):
    """residual="even" halves a sum's relevance per stream between the branches whose value
    in that stream is nonzero; a branch with a zero stream value there gets none of it and
    the other all. It gave each half, and the zero branch's layer below absorbed it: row 0
    of the two-input model kept 81% of the seed with activation_rule="wta"."""
    x1, x2, seed = _two_inputs()
    sm = core.split(_TwoInputs("sum", bias=False).double().eval(), stabilizer=stabilizer)
    pairs = sm.pairs((x1, x2), ["a", "b"])  # a ReLU's a- is its pre-activation's z-
    assert ((pairs["b"].neg == 0) & (pairs["a"].neg != 0)).any()  # a zero branch
    rel = sm.relevance((x1, x2), seed, activation_rule="wta", residual="even", epsilon=1e-12)
    total = sum((r.pos + r.neg).sum(1) for r in rel["input"])
    torch.testing.assert_close(total, seed.sum(1), rtol=1e-6, atol=0)  # row 0: 0.81 before
    assert all(torch.isfinite(r.pos).all() and torch.isfinite(r.neg).all()
               for r in rel["input"])

    model = _ZeroShortcut().double().eval()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).abs()
    seed = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    sm = core.split(model, stabilizer=stabilizer)
    p = sm.pairs(x, ["act", "act2"])
    only_body = (p["act"].neg == 0) & (p["act2"].neg != 0)
    both = {"pos": (p["act"].pos != 0) & (p["act2"].pos != 0),
            "neg": (p["act"].neg != 0) & (p["act2"].neg != 0)}
    assert only_body.any() and both["pos"].any() and both["neg"].any()
    for rule in ("pass", "wta"):
        rel = sm.relevance(x, seed, layers=["act2", "join"], activation_rule=rule,
                           epsilon=1e-12)
        total = (rel["input"].pos + rel["input"].neg).sum(1)
        if rule == "wta":
            torch.testing.assert_close(total, seed.sum(1), rtol=1e-6, atol=0)
        assert torch.isfinite(rel["input"].pos).all() and torch.isfinite(rel["input"].neg).all()
        # the body branch takes all of the sum's a- relevance where the shortcut has no a-
        assert torch.equal(rel["act2"].neg[only_body], rel["join"].neg[only_body])
        # and exactly half where both branches carry the stream (the paper's rule, unchanged)
        for stream, mask in both.items():
            assert torch.equal(getattr(rel["act2"], stream)[mask],
                               getattr(rel["join"], stream)[mask] / 2)


def test_relevance_that_is_not_finite_at_the_input_is_refused():
    """At epsilon=0 an all-zero input divides 0 by 0 in the first layer's step; the NaN
    reached the input's relevance, which no step pops, and was returned (core and Zennit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 3, 6, 6))
    model.eval()
    x, seed = torch.zeros(2, 3, 6, 6), torch.eye(5)[[1, 2]]
    with pytest.raises(core.SplitOverflowError,
                       match=r"overflowed torch\.float32 at the input .*epsilon=0\).*epsilon"):
        core.split(model).relevance(x, seed, epsilon=0.0)
    rel = core.split(model).relevance(x, seed)["input"]  # the default epsilon: finite
    assert torch.isfinite(rel.pos).all() and torch.isfinite(rel.neg).all()
