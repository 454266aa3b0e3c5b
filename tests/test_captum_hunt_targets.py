"""LayerCAM and Grad-CAM++ take every class-index target form that SplitCAM takes (found by a
hunt for breaks of Captum's contract: they checked these forms, then handed them to Captum's
target selection, which refused them with an AssertionError)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from captum_split import GradCAMPlusPlus, LayerCAM, SplitCAM


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double().eval()


FORMS = {
    "numpy int": (np.int64(3), 3),
    "numpy array": (np.array([1, 2, 3]), [1, 2, 3]),
    "list of numpy ints": ([np.int64(1), np.int64(2), np.int64(3)], [1, 2, 3]),
    "list of 0-d tensors": ([torch.tensor(1), torch.tensor(2), torch.tensor(3)], [1, 2, 3]),
    "(B, 1) tensor": (torch.tensor([[1], [2], [3]]), [1, 2, 3]),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method", [LayerCAM, GradCAMPlusPlus, SplitCAM],
                         ids=["LayerCAM", "GradCAMPlusPlus", "SplitCAM"])
def test_every_class_index_form_gives_the_map_of_plain_ints(method, form):
    model = _model()
    x = torch.randn(3, 3, 6, 6, dtype=torch.double)
    explainer = method(model, "1")
    target, plain = FORMS[form]
    got = explainer.attribute(x, target=target)
    expected = explainer.attribute(x, target=plain)
    assert got.shape == (3, 1, 6, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", [LayerCAM, GradCAMPlusPlus])
def test_a_class_past_the_outputs_is_still_refused_after_the_forward(method):
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    with pytest.raises(ValueError, match="target 7 is out of range for a model with 5"):
        method(_model(), "1").attribute(x, target=np.array([1, 7]))
