"""The rule table: each rule carries the metadata that the planner and SplitLRP read."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import core
from core import rules
from core.registry import Rule


def _node(fn, *args) -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(fn, (x, *args))


def test_metadata_is_validated():
    with pytest.raises(ValueError, match="merge"):
        Rule(lambda ctx, args, kwargs: None, merge="conv")
    with pytest.raises(ValueError, match="lrp"):
        Rule(lambda ctx, args, kwargs: None, lrp="gradient")


def test_powers_state_their_exponent():
    power = rules.lookup("call_function", operator.pow)
    assert power.exponent(_node(operator.pow, 3)) == 3
    assert power.exponent(_node(operator.pow, 0.5)) is None  # frozen, not a product
    assert power.exponent(_node(operator.pow, True)) is None
    assert rules.lookup("call_function", torch.square).exponent(_node(torch.square)) == 2
    assert rules.lookup("call_function", operator.mul).exponent is None


def test_batchnorm_merging_and_refusal_come_from_the_rules():
    for module, role in ((nn.Linear(2, 2), "affine"), (nn.Conv2d(1, 1, 1), "affine"),
                         (nn.BatchNorm2d(2), "batchnorm"), (nn.SyncBatchNorm(2), "batchnorm"),
                         (nn.ConvTranspose2d(1, 1, 1), None), (nn.ReLU(), None)):
        assert rules.lookup("call_module", "m", module).merge == role, module
    bn = rules.lookup("call_module", "m", nn.BatchNorm1d(2))
    assert bn.refuses(None, nn.BatchNorm1d(2)) is None
    assert "running statistics" in bn.refuses(None, nn.BatchNorm1d(2, track_running_stats=False))
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    message = r"'1' \(BatchNorm1d\): batch normalisation without running statistics"
    with pytest.raises(core.UnsupportedOperation, match=message):
        core.split(model.eval())
