"""``core.dc.train.train_model`` / ``evaluate`` refuse data they cannot use, before any step."""

from __future__ import annotations

import pytest
import torch

import core.dc.models as dc
from core.dc import train as dc_train


def small(num_classes: int = 10) -> dc.DifferenceModel:
    g, h = (dc.MaxoutMLP("Mon", num_classes=num_classes, hidden=8) for _ in range(2))
    return dc.DifferenceModel(g, h, False, "DM")


def dataset(x: torch.Tensor, y: torch.Tensor) -> dc_train.Dataset:
    return dc_train.Dataset(x, y, x, y, "synthetic")


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28)


@pytest.mark.parametrize("data, kwargs, message", [
    (dataset(images(0), torch.zeros(0, dtype=torch.long)), {}, "training set is empty"),
    (dataset(images(1), torch.zeros(1, dtype=torch.long)), {}, "holds 1 sample"),
    (dataset(images(8), torch.zeros(8, dtype=torch.long)), {"batch_size": 1}, "batch_size"),
    (dataset(images(6), torch.zeros(4, dtype=torch.long)), {}, "6 images but 4 labels"),
    (dataset(images(4), torch.tensor([0, 1, 10, 2])), {}, r"0\.\.9.*from 0 to 10"),
    (dataset(images(4), torch.tensor([0, -1, 1, 2])), {}, r"0\.\.9.*from -1 to 2"),
    (dataset(images(4), torch.zeros(4, 1, dtype=torch.long)), {}, "1-D integer"),
    (dataset(images(4), torch.zeros(4)), {}, "1-D integer"),
])
def test_bad_training_data_is_refused_before_any_step(data, kwargs, message):
    """Before: empty data, one sample or batch_size=1 trained nothing and returned the model
    as if trained; surplus images were ignored; a bad label crashed mid-epoch."""
    model = small().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dc_train.train_model(model, data, epochs=1, progress=False, **kwargs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


def test_labels_beyond_a_smaller_head_are_refused():
    with pytest.raises(ValueError, match=r"0\.\.2 \(the model has 3 outputs\)"):
        dc_train.train_model(small(3), dataset(images(4), torch.tensor([0, 1, 2, 5])),
                             epochs=1, progress=False)


def test_float64_model_trains_and_evaluates_on_float32_images():
    torch.manual_seed(0)
    model = small().double()
    data = dataset(images(8), torch.arange(8) % 10)
    before = model.g.layers.fc1.weight.clone()
    dc_train.train_model(model, data, epochs=1, batch_size=4, progress=False)
    assert not torch.equal(before, model.g.layers.fc1.weight)
    assert 0 <= dc_train.evaluate(model, data.test_x, data.test_y) <= 100


@pytest.mark.parametrize("x, y, message", [
    (images(3), torch.zeros(3, 1, dtype=torch.long), "1-D integer"),  # was 300 %
    (images(0), torch.zeros(0, dtype=torch.long), "test set is empty"),  # was 0 %
    (images(3), torch.zeros(5, dtype=torch.long), "3 images but 5 labels"),
])
def test_evaluate_refuses_labels_that_give_a_wrong_accuracy(x, y, message):
    model = small().train()
    with pytest.raises(ValueError, match=message):
        dc_train.evaluate(model, x, y)
    assert model.training
