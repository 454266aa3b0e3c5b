"""What a Zennit user does with SplitLRP that the other Zennit tests do not cover."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlus, MixedComposite

from tests.test_zennit_composite import small_cnn
from zennit_split import SplitLRP

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")



def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOK_DICTS)


@pytest.mark.parametrize("others", [[], [EpsilonPlus()]], ids=["alone", "with_epsilon_plus"])
@pytest.mark.parametrize("split_first", [True, False])
def test_split_lrp_inside_a_mixed_composite_is_one_clear_error(others, split_first):
    # MixedComposite asks each composite's module_map for rules; SplitLRP's had none, so it
    # was silently dropped: the attributor returned EpsilonPlus's relevance (signed sums
    # 0.099, -0.112) or, alone, the plain gradient, with no sign that SplitLRP was ignored
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    composites = [SplitLRP(), *others] if split_first else [*others, SplitLRP()]
    hooks = hook_count(model)
    with pytest.raises(ValueError, match="SplitLRP.*MixedComposite"):
        with Gradient(model, MixedComposite(composites)) as attributor:
            attributor(x, torch.eye(5)[[1, 3]])
    assert hook_count(model) == hooks
