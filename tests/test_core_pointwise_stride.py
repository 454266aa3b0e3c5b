"""A 1x1 convolution with stride and no padding (ResNet's downsampling shortcut) takes its
backward through the strided slice of its input on CPU (core.pointwise): the same split pair
(``d`` the model's output bit for bit), the same sensitivities and relevance as through
torch's strided convolution, and no strided 1x1 convolution left in the backward passes or
in the ``s`` stream (torch's CPU backward of those is up to 5x slower)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import core
from core import rules

CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 1, stride=2), (2, 3, 11)),
    "conv2d-uneven": (lambda: nn.Conv2d(4, 6, 1, stride=(2, 3)), (2, 3, 9, 7)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 1, stride=2, groups=2, bias=False),
                      (2, 3, 8, 8)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 6, 1, stride=2, padding_mode="reflect"),
                       (2, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 1, stride=(1, 2, 2)), (2, 3, 5, 6, 6)),
}


def _model(case: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    make, shape = CASES[case]
    torch.manual_seed(len(case))
    n = len(shape) - 2
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    strided = make()
    with torch.no_grad():
        probe = strided(torch.zeros((1, 4) + shape[2:]))
    model = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), strided, nn.ReLU(),
                          nn.Flatten(), nn.Linear(probe[0].numel(), 5))
    return model.eval().to(dtype), torch.randn(shape, dtype=dtype)


def _without_slice(monkeypatch) -> None:
    monkeypatch.setattr(rules, "subsampling", lambda *args: None)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_pair_and_sensitivities_equal_the_strided_convolution(case, dtype,
                                                                    monkeypatch):
    model, x = _model(case, dtype)
    target = torch.tensor([1, 3])
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.float64: dict(rtol=1e-12, atol=1e-13)}[dtype]
    sm = core.split(model)
    with torch.no_grad():
        pair = sm.forward_pairs(x)
        out = model(x)
    assert torch.equal(pair.d, out)  # the model's own convolution, bit for bit
    probes = {alpha: sm.sensitivities(x, target, ["input", "1"], alpha=alpha)
              for alpha in (0.4, "auto")}
    seed = torch.nn.functional.one_hot(target, 5).to(dtype)
    lrp = sm.relevance(x, seed)["input"]

    _without_slice(monkeypatch)
    ref_sm = core.split(model, reuse_capture=False)
    with torch.no_grad():
        ref = ref_sm.forward_pairs(x)
    torch.testing.assert_close(pair.s, ref.s, **tol)
    for alpha, found in probes.items():
        expected = ref_sm.sensitivities(x, target, ["input", "1"], alpha=alpha)
        for layer in ("input", "1"):
            for field in ("S", "Dg", "grad", "mass"):
                torch.testing.assert_close(getattr(found[layer], field),
                                           getattr(expected[layer], field), **tol)
    ref_lrp = ref_sm.relevance(x, seed)["input"]
    torch.testing.assert_close(lrp.pos, ref_lrp.pos, **tol)
    torch.testing.assert_close(lrp.neg, ref_lrp.neg, **tol)


class _StridedPointwise(TorchDispatchMode):
    """Records the convolutions (forward and backward) with a 1x1 kernel and a stride."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)
        if packet in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            weight = args[1] if packet is torch.ops.aten.convolution else args[2]
            stride = args[3] if packet is torch.ops.aten.convolution else args[4]
            if all(k == 1 for k in weight.shape[2:]) and any(s != 1 for s in stride):
                self.found.append((packet, tuple(weight.shape), tuple(stride)))
        return func(*args, **(kwargs or {}))


def test_no_strided_pointwise_convolution_runs_in_the_split():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    sm = core.split(model)
    sm.forward_pairs(x)  # the capture runs the model's own forward: not recorded below
    with _StridedPointwise() as seen:
        sm.sensitivities(x, torch.tensor([0, 2]), ["input"], alpha="auto")
        sm.relevance(x, torch.eye(3)[[0, 2]])
    # the d stream's forward is the model's own strided convolution, once per pass
    assert {found[0] for found in seen.found} == {torch.ops.aten.convolution}
    with _StridedPointwise() as seen:  # the model's own forward has one (the check sees it)
        model(x)
    assert len(seen.found) == 1
