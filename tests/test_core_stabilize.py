"""The forward stabilisers (core.stabilize) against their definition, row by row.

``stabilise`` takes its decisions on per-sample extremes on the host, by bounds that decide
most rows and an exact maximum for the others, and reduces long rows one by one. Each path is
checked here against the definition written out directly: a sample is stabilised when
``max (|s| + |d|) / 2`` exceeds the threshold; "scale" multiplies its ``s`` by ``theta ** k``,
the least ``k >= 1`` with ``max |theta ** k s| / 2 <= threshold``; "shift" sets it to zero.
"""

from __future__ import annotations

import math

import pytest
import torch

from core import stabilize

THETA, THRESHOLD = 0.1, 10.0


def _expected(d: torch.Tensor, s: torch.Tensor, mode: str, theta: float = THETA,
              threshold: float = THRESHOLD) -> torch.Tensor:
    out = s.clone()
    for row in range(s.shape[0]):
        peak = float((s[row].abs() + d[row].abs()).max()) / 2
        if math.isnan(peak) or peak <= threshold:
            continue
        if mode == "shift":
            out[row] = 0
            continue
        k = 1
        while float((s[row] * theta ** k).abs().max()) / 2 > threshold and theta < 1:
            k += 1
        out[row] = s[row] * (theta ** k if theta < 1 else 1.0)
    return out


def _rows_case(batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every kind: small (left alone), large (decided by the bounds), one where only
    the exact maximum decides, one where the bounds meet no single element."""
    g = torch.Generator().manual_seed(batch * 1000 + width)
    d = torch.rand(batch, width, generator=g)
    s = torch.rand(batch, width, generator=g)
    s[0] *= 500.0                                     # max |s| / 2 far above the threshold
    if batch > 1:
        d[1], s[1] = 0.5, 0.5                         # far below
    if batch > 2:
        # max|s| + max|d| = 24 > 2 * threshold at different elements, each alone below it:
        # only the exact maximum decides (it is 12 / 2 < threshold: left alone)
        d[2], s[2] = 0.0, 0.0
        d[2, 0], s[2, 1] = 12.0, 12.0
    if batch > 3:
        d[3], s[3] = 0.0, 0.0
        d[3, 0], s[3, 0] = 12.0, 12.0                 # same, at one element: (12 + 12) / 2
    if batch > 4:
        d[4], s[4] = -torch.rand(width, generator=g) * 30, -torch.rand(width, generator=g)
    return d, s


@pytest.mark.parametrize("mode", ["scale", "shift"])
@pytest.mark.parametrize("batch,width", [(5, 64), (5, 3), (2, stabilize._LONG_ROW), (1, 64),
                                         (1, stabilize._LONG_ROW)])
def test_stabilise_matches_its_definition(mode, batch, width):
    d, s = _rows_case(batch, width)
    out = stabilize.stabilise(d, s, mode, THETA, THRESHOLD)
    torch.testing.assert_close(out, _expected(d, s, mode), rtol=1e-6, atol=0)
    if batch > 3:
        assert torch.equal(out[2], s[2]) and not torch.equal(out[3], s[3])


def test_long_rows_and_short_rows_take_the_same_decisions(monkeypatch):
    d, s = _rows_case(5, stabilize._LONG_ROW)
    long = stabilize.stabilise(d, s, "scale", THETA, THRESHOLD)  # aminmax, one row at a time
    monkeypatch.setattr(stabilize, "_LONG_ROW", 2 * s.shape[1])
    short = stabilize.stabilise(d, s, "scale", THETA, THRESHOLD)  # amin / amax along rows
    assert torch.equal(long, short) and not torch.equal(long, s)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_one_sample_is_reduced_whole_as_its_row_among_others(nonnegative):
    """One sample is reduced over the whole tensor (no reshape): the extremes of its row."""
    d, s = _rows_case(5, 64)
    s[1, 7] = float("nan")
    if nonnegative:
        d = d.abs()
    rows = stabilize._extremes(d, s, nonnegative)
    for row in range(5):
        alone = stabilize._extremes(d[row:row + 1].view(1, 4, 16), s[row:row + 1].view(1, 4, 16),
                                    nonnegative)
        assert str(alone) == str(rows[row:row + 1])  # NaN == NaN by its text


def test_unchanged_stream_is_returned_as_is():
    d, s = torch.rand(3, 10), torch.rand(3, 10)
    assert stabilize.stabilise(d, s, "scale", THETA, THRESHOLD) is s
    assert stabilize.stabilise(d, s, "shift", THETA, THRESHOLD) is s
    big = s * 1e3
    assert stabilize.stabilise(d, big, "none", THETA, THRESHOLD) is big
    assert stabilize.stabilise(d, big, "scale", 1.0, THRESHOLD) is big  # theta 1: a no-op


def test_nan_rows_are_left_alone_and_infinite_mass_gets_factor_zero():
    d, s = torch.zeros(3, 4), torch.ones(3, 4)
    s[0, 0] = float("nan")
    s[1] *= 100.0
    s[2, 1] = float("inf")
    out = stabilize.stabilise(d, s, "scale", THETA, THRESHOLD)
    assert torch.equal(out[0].isnan(), s[0].isnan()) and torch.equal(out[0, 1:], s[0, 1:])
    torch.testing.assert_close(out[1], s[1] * THETA)
    assert out[2, 0] == 0 and out[2, 1].isnan()  # inf * 0: the overflow check reports it


def test_gradient_passes_to_the_unstabilised_stream():
    d = torch.rand(2, 6)
    s = (torch.rand(2, 6) * 300).requires_grad_()
    out = stabilize.stabilise(d, s, "scale", THETA, THRESHOLD)
    assert not torch.equal(out.detach(), s.detach())
    (out * torch.arange(12.0).view(2, 6)).sum().backward()
    torch.testing.assert_close(s.grad, torch.arange(12.0).view(2, 6))


def test_zero_dim_and_one_dim_streams():
    s0 = torch.tensor(500.0)
    torch.testing.assert_close(stabilize.stabilise(torch.tensor(0.0), s0, "scale", THETA,
                                                   THRESHOLD), torch.tensor(5.0))
    s1 = torch.tensor([1.0, 500.0])  # one sample per element
    torch.testing.assert_close(stabilize.stabilise(torch.zeros(2), s1, "scale", THETA,
                                                   THRESHOLD), torch.tensor([1.0, 5.0]))


@pytest.mark.parametrize("mode", ["scale", "shift"])
@pytest.mark.parametrize("batch,width", [(5, 64), (4, stabilize._LONG_ROW)])
def test_a_nonnegative_d_skips_its_minimum_and_takes_the_same_decisions(mode, batch, width):
    d, s = _rows_case(batch, width)
    d = d.abs()  # a ReLU's output
    d[-1, 3] = float("nan")  # a NaN in d shows in its maximum as well
    given = stabilize.stabilise(d, s, mode, THETA, THRESHOLD, d_nonnegative=True)
    full = stabilize.stabilise(d, s, mode, THETA, THRESHOLD)
    assert torch.equal(given, full) and not torch.equal(given, s)
    torch.testing.assert_close(given, _expected(d, s, mode), rtol=1e-6, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_one_sample_is_scaled_by_the_factor_in_its_dtype(dtype):
    """One sample is scaled by a Python number where that gives the bits of a tensor factor
    of the dtype (float32, float64), else by such a tensor: the same bits either way."""
    d, s = _rows_case(1, 64)
    d, s = d.to(dtype), (s * 3.0).to(dtype)
    (factor,) = stabilize._scale_factors(d, s, THETA, THRESHOLD)
    assert factor < 1.0
    out = stabilize.stabilise(d, s.clone(), "scale", THETA, THRESHOLD, inplace=True)
    assert torch.equal(out, s * torch.tensor(factor, dtype=dtype))
