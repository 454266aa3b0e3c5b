"""|W| affine maps: same values and gradients as the plain ops, blocked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core import absops


@pytest.mark.parametrize("block", [absops.BLOCK, 1000])  # the second forces row blocks
def test_abs_linear_matches_plain_linear(monkeypatch, block):
    monkeypatch.setattr(absops, "BLOCK", block)
    torch.manual_seed(0)
    w, b = torch.randn(37, 300, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    s = torch.rand(4, 300, dtype=torch.float64, requires_grad=True)
    out = absops.abs_linear(s, w, b.abs())
    ref = F.linear(s, w.abs(), b.abs())
    torch.testing.assert_close(out, ref)
    seed = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, seed)[0],
                               torch.autograd.grad(ref, s, seed)[0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_abs_conv_matches_plain_conv(n):
    torch.manual_seed(n)
    w = torch.randn((6, 2) + (3,) * n, dtype=torch.float64)
    s = torch.rand((2, 4) + (7,) * n, dtype=torch.float64, requires_grad=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    out = absops.abs_conv(s, w, None, n, 2, 1, 1, 2)
    ref = conv(s, w.abs(), None, 2, 1, 1, 2)
    torch.testing.assert_close(out, ref)
    seed = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, seed)[0],
                               torch.autograd.grad(ref, s, seed)[0])


@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 7), (2, 5, 4, 3), (1, 5, 2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_affine_is_k_s_plus_t_with_backward_grad_times_k(shape, dtype):
    torch.manual_seed(len(shape))
    k, t = torch.rand(5, dtype=dtype), torch.rand(5, dtype=dtype)
    column = (1, 5) + (1,) * (len(shape) - 2)
    s = torch.rand(shape, dtype=dtype, requires_grad=True)
    seed = torch.randn(shape, dtype=dtype)
    ref = torch.addcmul(t.view(column), s, k.view(column))
    with torch.no_grad():
        torch.testing.assert_close(absops.channel_affine(s, k, t), ref)
    out = absops.channel_affine(s, k, t)
    torch.testing.assert_close(out, ref)
    grad = torch.autograd.grad(out, s, seed)[0]
    assert torch.equal(grad, seed * k.view(column))
    # the placeholder (no value) has the same backward, bit for bit
    free = absops.channel_affine(s, k, t, value=False)
    assert free.shape == ref.shape and not free.any()
    assert torch.equal(torch.autograd.grad(free, s, seed)[0], grad)


def test_scratch_reuses_one_buffer_per_dtype_and_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(absops, "BLOCK", 500)
    scratch = absops.AbsScratch()
    torch.manual_seed(3)
    small, large = torch.randn(4, 3, 3, 3), torch.randn(6, 4, 3, 3)  # 108 and 216 entries
    first = scratch.abs(large)
    second = scratch.abs(small)
    assert torch.equal(second, small.abs())
    assert second.data_ptr() == first.data_ptr()  # the same memory, written again
    assert not torch.equal(first, large.abs())    # (so a |W| is valid until the next call)
    double = scratch.abs(large.double())
    assert double.dtype == torch.float64 and double.data_ptr() != first.data_ptr()
    big = torch.randn(600)                          # over BLOCK: a new tensor
    assert torch.equal(scratch.abs(big), big.abs()) and scratch.abs(big).data_ptr() != \
        first.data_ptr()


def test_split_with_scratch_matches_fresh_abs_bit_for_bit(monkeypatch):
    import torchvision

    import core

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([1, 7])

    def run():
        sm = core.split(model, reuse_capture=False)
        with torch.no_grad():
            out = sm.forward_pairs(x)
        probe = sm.sensitivities(x, target, ["layer2", "input"], alpha=0.4)
        return out, probe

    out, probe = run()
    monkeypatch.setattr(absops.AbsScratch, "abs", lambda self, w: w.abs())
    ref_out, ref_probe = run()
    assert torch.equal(out.d, ref_out.d) and torch.equal(out.s, ref_out.s)
    for layer in ("layer2", "input"):
        for field in ("S", "Dg", "grad", "mass"):
            assert torch.equal(getattr(probe[layer], field), getattr(ref_probe[layer], field))


def test_scratch_is_one_per_thread_and_shared_by_the_splits_of_a_thread(monkeypatch):
    """A new split of the same model (what an adapter makes at every call) writes |W| into
    the buffer the last one used, instead of mapping a new one; another thread has its own."""
    import threading

    import core

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    seen: list[int] = []
    original = absops.AbsScratch.abs

    def spy(self, weight):
        out = original(self, weight)
        seen.append(out.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(absops.AbsScratch, "abs", spy)
    with torch.no_grad():
        core.split(model).forward_pairs(x)  # the buffer grows to the largest weight
        seen.clear()
        core.split(model).forward_pairs(x)
        here = set(seen)
        seen.clear()
        thread = threading.Thread(target=lambda: core.split(model).forward_pairs(x))
        thread.start()
        thread.join()
    there = set(seen)
    assert len(here) == 1 and len(there) >= 1 and here.isdisjoint(there)


@pytest.mark.parametrize("padding", [1, "same"])
def test_scratch_survives_double_backward(padding):
    torch.manual_seed(4)
    scratch = absops.AbsScratch()
    w1, w2 = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(4, 5, 3, 3,
                                                                          dtype=torch.float64)
    s = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(s, scratch):
        h = absops.abs_conv(s, w1, None, 2, 1, padding, 1, 1, scratch=scratch) ** 2
        return (absops.abs_conv(h, w2, None, 2, 1, padding, 1, 1, scratch=scratch) ** 2).sum()

    def hessian_vector(scratch):
        (g,) = torch.autograd.grad(f(s, scratch), s, create_graph=True)
        return torch.autograd.grad((g * torch.arange(72.0, dtype=g.dtype).view_as(g)).sum(),
                                   s)[0]

    assert torch.equal(hessian_vector(scratch), hessian_vector(None))


def test_scratch_keeps_the_weights_memory_format():
    scratch = absops.AbsScratch()
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = scratch.abs(w)
    assert out.stride() == w.stride() and torch.equal(out, w.abs())
    gaps = torch.randn(8, 8)[:, ::2]  # a slice with gaps: a new tensor, as weight.abs()
    assert torch.equal(scratch.abs(gaps), gaps.abs())
    assert scratch.abs(gaps).data_ptr() != out.data_ptr()


@pytest.mark.parametrize("value", [True, False])
def test_negative_part_gradient_is_minus_one_where_the_relu_is_off(value):
    """``s + relu(-z)``: gradient ``-1{z <= 0}`` in ``z`` (with exact zeros in ``z``, where
    the ReLU's own derivative is 0), 1 in ``s``; the same as a placeholder (``value=False``)."""
    torch.manual_seed(7)
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    z[0, 0, :2] = 0.0
    z.requires_grad_(True)
    s = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = absops.add_negative_part(s, z, F.relu(z), value)
    seed = torch.randn_like(out)
    gz, gs = torch.autograd.grad(out, (z, s), seed)
    assert torch.equal(gz, torch.where(z <= 0, -seed, torch.zeros_like(seed)))
    assert torch.equal(gs, seed)
    if value:
        assert torch.equal(out, s + F.relu(-z))
