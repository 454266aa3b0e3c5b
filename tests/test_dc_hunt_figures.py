"""``core.dc.explain`` figures: labels checked first, the returned path is the file written."""

from __future__ import annotations

import pytest
import torch

import core.dc.models as dc
from core.dc import explain

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def model() -> dc.DifferenceModel:
    torch.manual_seed(0)
    g, h = (dc.MaxoutMLP("Mon", hidden=8) for _ in range(2))
    return dc.DifferenceModel(g, h, False, "DM").eval()


X = torch.rand(2, 1, 28, 28)


def test_a_path_without_suffix_returns_the_written_file(model, tmp_path):
    """matplotlib wrote fig.png while fig (not a file) was returned."""
    path = explain.figure_classes(model, X, tmp_path / "new" / "fig")
    assert path == tmp_path / "new" / "fig.png" and path.is_file()
    path = explain.figure_samples(model, X, torch.tensor([1, 2]), tmp_path / "a" / "b.png")
    assert path == tmp_path / "a" / "b.png" and path.is_file()


@pytest.mark.parametrize("labels, error, message", [
    (torch.tensor([1, -1]), ValueError, "negative"),  # drew class 9 silently
    (torch.tensor([1, 10]), ValueError, "out of range"),
    (torch.tensor([1, 2, 3]), ValueError, "3 targets for a batch of 2"),  # surplus ignored
])
def test_bad_labels_are_refused_before_drawing(model, tmp_path, labels, error, message):
    with pytest.raises(error, match=message):
        explain.figure_samples(model, X, labels, tmp_path / "s.png")
    with pytest.raises(error, match=message):
        explain.figure_classes(model, X, tmp_path / "c.png", labels)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 100), (2, 1, 14, 14)])
def test_inputs_that_are_not_digits_are_refused(model, tmp_path, shape):
    """A (2, 3, 28, 28) batch was drawn as six grey digits; other sizes gave torch's
    reshape error."""
    for call in (lambda x: explain.figure_classes(model, x, tmp_path / "a.png"),
                 lambda x: explain.figure_samples(model, x, torch.tensor([0, 1]),
                                                  tmp_path / "b.png"),
                 lambda x: explain.colour_maps(model, x)):
        with pytest.raises(ValueError, match=r"x must be \(B, 1, 28, 28\)"):
            call(torch.rand(shape))
    assert not (tmp_path / "a.png").exists()


def test_digit_layouts_give_the_same_maps(model):
    x = torch.rand(2, 1, 28, 28)
    red, blue = explain.colour_maps(model, x)
    for layout in (x.reshape(2, 784), x.reshape(2, 28, 28)):
        r, b = explain.colour_maps(model, layout)
        assert (r == red).all() and (b == blue).all()
