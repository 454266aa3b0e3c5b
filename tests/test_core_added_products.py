"""``torch.addmv``, ``torch.baddbmm`` and ``torch.addbmm`` (``beta x + alpha a * b`` for a
matrix-vector, batched or batch-summed matrix product) split as the sum written out: the same
pair, sensitivities and SplitLRP relevance, with a constant or an activation as each operand
(two activations: the product rule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import core
from tests.core_checks import check_float64_exact

OPS = {"addmv": torch.addmv, "baddbmm": torch.baddbmm, "addbmm": torch.addbmm}


def _product(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op == "addmv":
        return a @ b
    if op == "baddbmm":
        return torch.bmm(a, b)
    return torch.bmm(a, b).sum(0)


class _Added(nn.Module):
    """``beta c + alpha A @ B`` for one sample (``x`` of shape ``(1, 4)``) with the operand
    shapes of ``op``; ``A`` an activation or (``constant_a``) a parameter, ``B`` an
    activation or (``constant_b``) a parameter, ``c`` a parameter or (``addend``) an
    activation; as ``op`` (``form``: the function or the tensor method) or written out."""

    SHAPES = {"addmv": ((3, 2), (2,), (3,)), "baddbmm": ((2, 3, 2), (2, 2, 2), (2, 3, 2)),
              "addbmm": ((2, 3, 2), (2, 2, 2), (3, 2))}

    def __init__(self, op: str, form: str, addend: bool = False, constant_a: bool = False,
                 constant_b: bool = False, beta: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.op, self.form, self.addend = op, form, addend
        self.constant_a, self.constant_b = constant_a, constant_b
        self.beta, self.alpha = beta, alpha
        sa, sb, sc = self.SHAPES[op]
        self.sa, self.sb, self.sc = sa, sb, sc
        self.a = nn.Linear(4, torch.Size(sa).numel())
        self.b = nn.Linear(4, torch.Size(sb).numel())
        self.c = nn.Linear(4, torch.Size(sc).numel())
        self.wa, self.wb = nn.Parameter(torch.randn(sa)), nn.Parameter(torch.randn(sb))
        self.bias = nn.Parameter(torch.randn(sc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.wa if self.constant_a else torch.relu(self.a(x)).view(self.sa)
        b = self.wb if self.constant_b else torch.relu(self.b(x)).view(self.sb)
        c = self.c(x).view(self.sc) if self.addend else self.bias
        if self.form == "written":
            out = self.beta * c + self.alpha * _product(self.op, a, b)
        elif self.form == "method":
            out = getattr(c, self.op)(a, b, beta=self.beta, alpha=self.alpha)
        else:
            out = OPS[self.op](c, a, b, beta=self.beta, alpha=self.alpha)
        return out.reshape(1, -1)


CASES = [{}, {"beta": -0.5, "alpha": 2.0}, {"addend": True}, {"constant_a": True},
         {"constant_b": True, "addend": True}]


def _pair(model: nn.Module, x: torch.Tensor) -> core.Pair:
    with torch.no_grad():
        return core.split(model).forward_pairs(x)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("form", ["function", "method"])
@pytest.mark.parametrize("case", CASES)
def test_the_split_is_that_of_the_sum_written_out(op, form, case):
    torch.manual_seed(5)
    model = _Added(op, form, **case).double().eval()
    written = _Added(op, "written", **case).double().eval()
    written.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, dtype=torch.float64)
    check_float64_exact(core.split(model), model, x, target=1)
    got, want = _pair(model, x), _pair(written, x)
    torch.testing.assert_close(got.d, want.d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.s, want.s, rtol=1e-12, atol=1e-12)
    layers = [n for n in ("a", "b", "c") if n != "c" or case.get("addend")]
    layers = [n for n in layers if not case.get(f"constant_{n}")]
    probes = [core.split(m).sensitivities(x, 1, layers, alpha=0.3) for m in (model, written)]
    for name in layers:
        for field in ("S", "Dg", "grad"):
            torch.testing.assert_close(getattr(probes[0][name], field),
                                       getattr(probes[1][name], field),
                                       rtol=1e-12, atol=1e-12, msg=f"{name} {field}")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", CASES[:3])
def test_relevance_is_that_of_the_sum_written_out(op, case):
    """Where both factors are activations each gets half of the relevance of the product;
    the added ``c`` keeps its epsilon-rule share (proportional residuals; a tiny epsilon,
    which the written-out sum applies twice: 1e-9 apart; epsilon 0 divides zero by zero at
    the input here)."""
    torch.manual_seed(6)
    model = _Added(op, "function", **case).double().eval()
    written = _Added(op, "written", **case).double().eval()
    written.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, dtype=torch.float64)
    width = model(x).shape[1]
    seed = torch.linspace(-1.0, 1.0, width, dtype=torch.float64).view(1, -1)
    layers = ["a", "b"] + ["c"] * bool(case.get("addend"))
    rel = [core.split(m).relevance(x, seed, layers=layers, epsilon=1e-9,
                                   residual="proportional") for m in (model, written)]
    for name in ("input", *layers):
        for stream in ("pos", "neg"):
            torch.testing.assert_close(rel[0][name].stream(stream), rel[1][name].stream(stream),
                                       rtol=1e-6, atol=1e-8, msg=f"{name} {stream}")
    assert rel[0]["input"].comb.abs().max() > 1e-3
