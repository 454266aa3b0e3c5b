"""The difference models' constructors refuse bad options in one line, before building
(a model with no outputs, NaN or inf weights, a negative std taken by its absolute value,
``inverted="False"`` read as True were built silently before)."""

from __future__ import annotations

import math

import pytest
import torch

import core.dc.models as dc


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    ({"num_classes": 0}, ValueError, "num_classes must be a positive int; got 0"),
    ({"num_classes": -1}, ValueError, "num_classes must be a positive int"),
    ({"num_classes": 2.5}, ValueError, "num_classes must be a positive int; got 2.5"),
    ({"num_classes": True}, ValueError, "num_classes must be a positive int"),
    ({"init_std": math.nan}, ValueError, "init_std is NaN"),
    ({"init_std": math.inf}, ValueError, "init_std must be finite"),
    ({"init_std": -0.01}, ValueError, "init_std=-0.01 is outside"),
    ({"init_std": 0.0}, ValueError, "init_std=0.0 is outside"),
    ({"positivity": ["relu"]}, ValueError, "unknown positivity transform"),
])
@pytest.mark.parametrize("factory", [dc.mlp_maxout, dc.cnn_maxout])
def test_bad_options_are_refused_by_name(factory, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        factory("DM", **kwargs)


def test_sizes_of_the_mlp_and_the_maxout_rank_are_checked():
    with pytest.raises(ValueError, match="hidden must be a positive int; got 0"):
        dc.MaxoutMLP("Mon", hidden=0)
    with pytest.raises(ValueError, match="rank must be a positive int; got 0"):
        dc.MaxoutMLP("Mon", hidden=4, rank=0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        dc.Maxout(rank=1.5)


def test_inverted_must_be_a_bool():
    g, h = dc.MaxoutMLP("Mon", hidden=4), dc.MaxoutMLP("Mon", hidden=4)
    with pytest.raises(TypeError, match="inverted must be True or False; got 'False'"):
        dc.DifferenceModel(g, h, "False", "DM")
    model = dc.DifferenceModel(g, h, False, "DM")
    x = torch.rand(2, 784)
    assert torch.equal(model.h_input(x), x)


def test_good_options_still_build():
    model = dc.mlp_maxout("DMIN", num_classes=3, init_std=0.02)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)
