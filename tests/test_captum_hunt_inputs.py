"""Inputs the split methods cannot split are refused before any forward pass with one line
that says what to pass (found by a hunt for breaks of Captum's contract)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_split import SplitCAM, SplitGrad


def _conv() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    return model, x, x.to_sparse()


def _tabular() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(2, 6)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        return model, x, x.to_sparse_csr()


@pytest.mark.parametrize("make", [_conv, _tabular], ids=["coo", "csr"])
@pytest.mark.parametrize("method", [SplitGrad, SplitCAM], ids=["SplitGrad", "SplitCAM"])
def test_a_sparse_input_is_one_typeerror_asking_for_a_dense_tensor(method, make):
    model, dense, sparse = make()
    explainer = method(model, "1") if method is SplitCAM else method(model)
    with pytest.raises(TypeError) as info:  # was a NotImplementedError of ~90 lines
        explainer.attribute(sparse, target=1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{method.__name__}: inputs must be dense tensors")
    assert str(sparse.layout) in message and "x.to_dense()" in message
    assert explainer.attribute(dense, target=1).shape[0] == 2  # the dense one is explained
