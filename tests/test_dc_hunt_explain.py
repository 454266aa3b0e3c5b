"""``core.dc.explain``: target forms, clear errors, and the user's model left as it was."""

from __future__ import annotations

import pytest
import torch

import core.dc.models as dc
from core.dc import explain


@pytest.fixture
def model() -> dc.DifferenceModel:
    torch.manual_seed(0)
    g, h = (dc.MaxoutMLP("IC", hidden=8) for _ in range(2))
    model = dc.DifferenceModel(g, h, True, "DICIN").train()
    model(torch.rand(4, 784)).sum().backward()  # the user's own .grad, to be kept
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def assert_unchanged(model, before):
    state, grads, flags = before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
    assert [m.training for m in model.modules()] == flags


X = torch.rand(3, 1, 28, 28)


@pytest.mark.parametrize("call, error, message", [
    # fractional float labels were truncated silently (0.7 -> class 0)
    (lambda m: explain.target_gradients(m, X, torch.tensor([0.7, 1.2, 2.9])), ValueError,
     "fractional"),
    (lambda m: explain.target_gradients(m, X, True), TypeError, "bool"),
    (lambda m: explain.target_gradients(m, X, 10), ValueError, r"\[0, 10\)"),
    (lambda m: explain.target_gradients(m, X, -1), ValueError, "negative"),
    (lambda m: explain.target_gradients(m, X, [0, 1]), ValueError, "2 targets for a batch of 3"),
    # ZeroDivisionError / "'int' object is not iterable" before
    (lambda m: explain.input_gradients(m, X, "h", classes=[]), ValueError, "classes is empty"),
    (lambda m: explain.input_gradients(m, X, "g", classes=3), TypeError, "not a single index"),
    (lambda m: explain.input_gradients(m, X, "g", classes=[1, 10]), ValueError,
     r"classes must lie in \[0, 10\)"),
])
def test_bad_targets_raise_and_leave_the_model_alone(model, call, error, message):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_unchanged(model, before)


def test_target_forms_agree_and_leave_the_model_alone(model):
    before = snapshot(model)
    per_row = explain.target_gradients(model, X, torch.tensor([2, 2, 2]), "h")
    assert torch.equal(per_row, explain.target_gradients(model, X, 2, "h"))
    assert torch.equal(per_row, explain.target_gradients(model, X, torch.tensor([2.0]), "h"))
    assert torch.equal(per_row, explain.input_gradients(model, X, "h", [2])[:, 0])
    assert per_row.abs().sum() > 0
    assert_unchanged(model, before)


def test_empty_batch_and_float64_inputs(model):
    # an empty batch raised from max() / torch.cat; float64 input a dtype mismatch
    assert explain.target_gradients(model, X[:0], 1).shape == (0, 1, 28, 28)
    assert explain.input_gradients(model, X[:0], "g").shape == (0, 10, 1, 28, 28)
    grad = explain.target_gradients(model, X.double(), 1, "g")
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, explain.target_gradients(model, X, 1, "g"))
