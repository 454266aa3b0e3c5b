"""The constrained batch norms keep ``torch.nn.BatchNorm``'s running statistics."""

from __future__ import annotations

import pytest
import torch

import core.dc.models as dc


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("constrained", [False, True])
def test_running_statistics_match_torch(momentum, constrained):
    """momentum=None is a cumulative average in torch; it was read as 0.1 (running mean off
    by 1.35 after five batches)."""
    torch.manual_seed(0)
    ours = dc.ConstrainedBatchNorm1d(4, constrained)
    reference = torch.nn.BatchNorm1d(4)
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        reference.weight.copy_(ours.effective_weight())
        reference.bias.copy_(ours.effective_bias())
    ours.momentum = reference.momentum = momentum
    for i in range(5):
        x = torch.randn(8, 4) * (i + 1) + i
        torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert int(ours.num_batches_tracked) == 5
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))
