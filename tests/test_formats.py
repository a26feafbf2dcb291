"""Quantizer numerics (qeval.quant.formats) against hand-computed values.

Conventions (see the module docstring of qeval.quant.formats):

* symmetric int b bits: qmax = 2^(b-1) - 1, scale = absmax / qmax, zero = 0,
  q = clamp(round(x / scale), -2^(b-1), qmax), x_hat = q * scale;
* asymmetric int b bits: lo = min(min(x), 0), hi = max(max(x), 0),
  scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale),
  q = clamp(round(x / scale) + zero, 0, 2^b - 1), x_hat = (q - zero) * scale;
* torch.round rounds half to even; all arithmetic is float32.
"""

from __future__ import annotations

import pytest
import torch

from qeval.quant.formats import (
    FP8_DTYPES,
    QuantFormat,
    fake_quantize,
    fake_quantize_per_tensor,
    fake_quantize_with_scale,
    quantize,
    quantize_weight,
)

SYM4 = QuantFormat(bits=4, kind="int", sym=True)
ASYM3 = QuantFormat(bits=3, kind="int", sym=False)
ASYM4 = QuantFormat(bits=4, kind="int", sym=False)
E4M3 = QuantFormat(bits=8, kind="fp8_e4m3")
E5M2 = QuantFormat(bits=8, kind="fp8_e5m2")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------- format ranges


def test_int_ranges():
    # sym b bits: [-2^(b-1), 2^(b-1)-1]; asym: [0, 2^b - 1]
    assert (SYM4.qmin, SYM4.qmax) == (-8, 7)
    assert (QuantFormat(8, "int", True).qmin, QuantFormat(8, "int", True).qmax) == (-128, 127)
    assert (QuantFormat(2, "int", True).qmin, QuantFormat(2, "int", True).qmax) == (-2, 1)
    assert (ASYM3.qmin, ASYM3.qmax) == (0, 7)
    assert (ASYM4.qmin, ASYM4.qmax) == (0, 15)
    assert E4M3.fp_max == 448.0
    assert E5M2.fp_max == 57344.0
    with pytest.raises(ValueError):
        _ = E4M3.qmax


# ---------------------------------------------------------------------------- symmetric int


def test_symmetric_int4_hand_computed():
    # x = [-1, 0.5, 0.25, 1], 4 bits sym: absmax = 1, qmax = 7 -> scale = 1/7.
    # x / scale = [-7, 3.5, 1.75, 7] in exact arithmetic.  But fl32(1/7) = 0.142857149...
    # is slightly ABOVE 1/7, so 0.5 / scale = 3.4999998 (not a tie) and rounds to 3;
    # 1.75 -> 2.  codes = [-7, 3, 2, 7];  x_hat = codes / 7 = [-1, 3/7, 2/7, 1].
    x = t([-1.0, 0.5, 0.25, 1.0])
    qt = quantize(x, SYM4)
    assert qt.zero is None
    assert qt.group_size == 4
    assert qt.scale.shape == (1,)
    assert qt.scale.item() == pytest.approx(1 / 7, rel=1e-7)
    assert torch.equal(qt.q, t([-7.0, 3.0, 2.0, 7.0]))
    expected = t([-1.0, 3 / 7, 2 / 7, 1.0])
    torch.testing.assert_close(qt.dequantize(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(fake_quantize(x, SYM4), expected, rtol=0, atol=1e-7)


def test_symmetric_int8_exact_grid_and_clamp_free():
    # absmax = 127 -> scale = 1; integers survive exactly, 2.4 -> 2, -0.6 -> -1
    x = t([127.0, -127.0, 3.0, 2.4, -0.6, 0.0])
    qt = quantize(x, QuantFormat(8, "int", True))
    assert qt.scale.item() == 1.0
    assert torch.equal(qt.q, t([127.0, -127.0, 3.0, 2.0, -1.0, 0.0]))
    assert torch.equal(qt.dequantize(), t([127.0, -127.0, 3.0, 2.0, -1.0, 0.0]))


def test_fake_quantize_keeps_dtype():
    x = t([-1.0, 0.5, 0.25, 1.0], dtype=torch.bfloat16)
    y = fake_quantize(x, SYM4)
    assert y.dtype == torch.bfloat16
    # 3/7 and 2/7 rounded to bf16
    assert torch.equal(y, t([-1.0, 3 / 7, 2 / 7, 1.0]).to(torch.bfloat16))


def test_all_zero_group_does_not_divide_by_zero():
    x = torch.zeros(2, 4)
    for fmt in (SYM4, ASYM4, E4M3):
        y = fake_quantize(x, fmt)
        assert torch.equal(y, x), fmt


# ---------------------------------------------------------------------------- asymmetric int


def test_asymmetric_int3_hand_computed():
    # x = [-0.6, 0.2, 0.9, 1.5], 3 bits asym: lo = -0.6, hi = 1.5, range 2.1,
    # scale = 2.1 / 7 = 0.3, zero = round(0.6 / 0.3) = 2.
    # x / scale = [-2, 0.667, 3, 5] -> round [-2, 1, 3, 5] -> + zero = [0, 3, 5, 7]
    # x_hat = (q - 2) * 0.3 = [-0.6, 0.3, 0.9, 1.5]
    x = t([-0.6, 0.2, 0.9, 1.5])
    qt = quantize(x, ASYM3)
    assert qt.scale.item() == pytest.approx(0.3, rel=1e-6)
    assert qt.zero.item() == 2.0
    assert torch.equal(qt.q, t([0.0, 3.0, 5.0, 7.0]))
    torch.testing.assert_close(qt.dequantize(), t([-0.6, 0.3, 0.9, 1.5]), rtol=0, atol=1e-6)


def test_asymmetric_range_contains_zero_all_positive():
    # x = [1, 2, 3, 7] (all positive): lo is clamped to 0, not 1 -> scale = 7/7 = 1, zero = 0.
    # Were the range [1, 7] instead, scale would be 6/7 and zero = round(-7/6) = -1.
    x = t([1.0, 2.0, 3.0, 7.0])
    qt = quantize(x, ASYM3)
    assert qt.scale.item() == 1.0
    assert qt.zero.item() == 0.0
    assert torch.equal(qt.q, t([1.0, 2.0, 3.0, 7.0]))
    assert torch.equal(qt.dequantize(), x)


def test_asymmetric_range_contains_zero_all_negative_zero_stays_exact():
    # x = [-7, -3, 0, -0.4]: hi is clamped to 0 -> lo = -7, scale = 7/7 = 1, zero = 7.
    # q = round(x) + 7 = [0, 4, 7, 7]  (round(-0.4) = 0);  x_hat = [-7, -3, 0, 0]
    x = t([-7.0, -3.0, 0.0, -0.4])
    qt = quantize(x, ASYM3)
    assert qt.scale.item() == 1.0
    assert qt.zero.item() == 7.0
    assert torch.equal(qt.q, t([0.0, 4.0, 7.0, 7.0]))
    assert torch.equal(qt.dequantize(), t([-7.0, -3.0, 0.0, 0.0]))


def test_asymmetric_zero_is_exact_for_arbitrary_ranges():
    # the zero point is an integer code, so an input 0.0 always dequantizes to exactly 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=g) + 0.7
    x[:, 5] = 0.0
    for bits in (2, 3, 4, 8):
        y = fake_quantize(x, QuantFormat(bits, "int", False), 8)
        assert torch.equal(y[:, 5], torch.zeros(16)), bits


# ---------------------------------------------------------------------------- per-group, partial groups


def test_per_group_partial_last_group_symmetric():
    # last dim 6, group_size 4 -> 2 groups: [1.5, -2, 0.5, 0.25] and the partial [0.1, -0.3].
    # group 0: absmax 2   -> scale 2/7;   x/scale = [5.25, -7, 1.75, 0.875] -> [5, -7, 2, 1]
    # group 1: absmax 0.3 -> scale 0.3/7 (from its 2 elements only);
    #          x/scale = [2.333, -7] -> [2, -7]
    # x_hat = [10/7, -2, 4/7, 2/7, 0.6/7, -0.3]
    x = t([[1.5, -2.0, 0.5, 0.25, 0.1, -0.3]])
    qt = quantize(x, SYM4, group_size=4)
    assert qt.scale.shape == (1, 2)
    assert qt.q.shape == (1, 6)
    torch.testing.assert_close(qt.scale, t([[2 / 7, 0.3 / 7]]), rtol=1e-6, atol=0)
    assert torch.equal(qt.q, t([[5.0, -7.0, 2.0, 1.0, 2.0, -7.0]]))
    expected = t([[10 / 7, -2.0, 4 / 7, 2 / 7, 0.6 / 7, -0.3]])
    torch.testing.assert_close(qt.dequantize(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(fake_quantize(x, SYM4, 4), expected, rtol=0, atol=1e-6)


def test_per_group_partial_last_group_asymmetric():
    # same x, 4 bits asym (qmax 15):
    # group 0: lo -2, hi 1.5 -> scale 3.5/15, zero round(2/(3.5/15)) = round(8.571) = 9
    # group 1 (own 2 elements): lo -0.3, hi 0.1 -> scale 0.4/15, zero round(11.25) = 11;
    #   0.1/scale = 3.75 -> 4 + 11 = 15;  -0.3/scale = -11.25 -> -11 + 11 = 0
    #   x_hat = [(15-11)*0.4/15, (0-11)*0.4/15] = [0.10667, -0.29333]
    x = t([[1.5, -2.0, 0.5, 0.25, 0.1, -0.3]])
    qt = quantize(x, ASYM4, group_size=4)
    assert qt.scale.shape == (1, 2) and qt.zero.shape == (1, 2)
    torch.testing.assert_close(qt.scale, t([[3.5 / 15, 0.4 / 15]]), rtol=1e-6, atol=0)
    assert torch.equal(qt.zero, t([[9.0, 11.0]]))
    assert torch.equal(qt.q[0, 4:], t([15.0, 0.0]))
    torch.testing.assert_close(qt.dequantize()[0, 4:], t([4 * 0.4 / 15, -11 * 0.4 / 15]), rtol=0, atol=1e-6)


def test_partial_group_scale_ignores_other_groups():
    # a huge value in the full group must not leak into the partial group's scale
    x = t([[100.0, 1.0, 1.0, 1.0, 0.7, -0.35]])
    qt = quantize(x, SYM4, group_size=4)
    torch.testing.assert_close(qt.scale[0], t([100 / 7, 0.7 / 7]), rtol=1e-6, atol=0)
    # partial group: scale 0.1, 0.7 -> code 7 (exact absmax); -0.35 is a near-tie (-3.5), so only
    # the error bound scale/2 is asserted for it
    err = (qt.dequantize()[0, 4:] - x[0, 4:]).abs()
    assert (err <= 0.7 / 7 / 2 + 1e-6).all()
    assert qt.dequantize()[0, 4].item() == pytest.approx(0.7, abs=1e-6)


def test_group_size_larger_than_row_is_one_group():
    x = t([[1.0, -0.5, 0.25]])
    qt = quantize(x, SYM4, group_size=128)
    assert qt.group_size == 3
    assert qt.scale.shape == (1, 1)
    assert torch.equal(quantize(x, SYM4, group_size=None).q, qt.q)


def test_group_size_dividing_exactly():
    x = torch.arange(16, dtype=torch.float32).reshape(2, 8) - 4.0
    qt = quantize(x, SYM4, group_size=4)
    assert qt.scale.shape == (2, 2)
    # row 0: [-4,-3,-2,-1 | 0,1,2,3] -> absmax 4, 3;  row 1: [4..7 | 8..11] -> 7, 11
    torch.testing.assert_close(qt.scale, t([[4 / 7, 3 / 7], [7 / 7, 11 / 7]]), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- per-token / per-tensor


def test_per_token_each_row_own_scale():
    # [tokens=3, hidden=4]; row absmax 1, 7, 0.5 -> scales 1/7, 1, 0.5/7 (4-bit sym)
    x = t([[1.0, -0.5, 0.25, 0.0], [7.0, -3.0, 2.0, 1.0], [0.5, 0.5, -0.5, 0.25]])
    qt = quantize(x, SYM4, None)
    assert qt.scale.shape == (3, 1)
    torch.testing.assert_close(qt.scale[:, 0], t([1 / 7, 1.0, 0.5 / 7]), rtol=1e-6, atol=0)
    # row 1 lies on the integer grid with scale 1 -> exact
    y = fake_quantize(x, SYM4, None)
    assert torch.equal(y[1], x[1])
    # each row equals quantizing that row on its own
    for i in range(3):
        assert torch.equal(y[i], fake_quantize(x[i], SYM4, None))
    # rows interact not at all: scaling row 1 by 100 leaves rows 0 and 2 unchanged
    x2 = x.clone()
    x2[1] *= 100
    y2 = fake_quantize(x2, SYM4, None)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2])


def test_per_token_3d_activation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    y = fake_quantize(x, QuantFormat(8, "int", True), None)
    assert y.shape == x.shape
    for b in range(2):
        for s in range(5):
            assert torch.equal(y[b, s], fake_quantize(x[b, s], QuantFormat(8, "int", True), None))


def test_per_tensor_one_scale():
    # absmax over the whole tensor = 7 -> scale 1 (4-bit sym); 0.4 -> 0, 2.6 -> 3, 0.5 -> 0 (tie->even)
    x = t([[7.0, 0.4], [2.6, -0.5]])
    y = fake_quantize_per_tensor(x, SYM4)
    assert torch.equal(y, t([[7.0, 0.0], [3.0, -0.0]]))
    # per-row would keep row 1's small values much finer
    per_row = fake_quantize(x, SYM4, None)
    assert not torch.equal(per_row, y)
    # scale 2.6/7 for row 1: 2.6 -> 7 -> 2.6;  -0.5/(2.6/7) = -1.346 -> -1 -> -2.6/7
    torch.testing.assert_close(per_row[1], t([2.6, -2.6 / 7]), rtol=0, atol=1e-6)


def test_fake_quantize_with_given_scale():
    # static parameters: scale 0.5, zero 0, 4-bit sym: x/0.5 = [1, 2.4, -20, 0.6] -> [1, 2, -8(clamp), 1]
    x = t([0.5, 1.2, -10.0, 0.3])
    y = fake_quantize_with_scale(x, SYM4, torch.tensor(0.5), None)
    assert torch.equal(y, t([0.5, 1.0, -4.0, 0.5]))
    # asym with zero 8, scale 1: q = clamp(round(x) + 8, 0, 15): 20 -> 15 -> 7, -10 -> 0 -> -8
    y = fake_quantize_with_scale(t([20.0, -10.0, 2.2]), ASYM4, torch.tensor(1.0), torch.tensor(8.0))
    assert torch.equal(y, t([7.0, -8.0, 2.0]))


# ---------------------------------------------------------------------------- FP8


@pytest.mark.parametrize(
    "fmt, values",
    [
        # absmax 448 = e4m3 max -> scale 1: every value below is an e4m3 number
        (E4M3, [448.0, -1.5, 0.125, 3.5, -240.0, 0.0, 2.0**-9, 26.0]),
        # absmax 57344 = e5m2 max -> scale 1: e5m2 numbers (2 mantissa bits)
        (E5M2, [57344.0, -1.5, 0.25, 3.0, -1024.0, 0.0, 2.0**-16, 28.0]),
    ],
)
def test_fp8_exactly_representable_values_survive(fmt, values):
    x = t(values)
    qt = quantize(x, fmt)
    assert qt.scale.item() == 1.0
    assert qt.zero is None
    assert torch.equal(qt.q, x)
    assert torch.equal(qt.dequantize(), x)
    assert torch.equal(fake_quantize(x, fmt), x)
    # a power-of-two multiple of the same row is still exact (scale = 2^k exactly)
    assert torch.equal(fake_quantize(x * 0.25, fmt), x * 0.25)


def test_fp8_rounding_hand_computed():
    # scale 1 (absmax 448).  e4m3 has 3 mantissa bits: between 16 and 32 the step is 2, and
    # odd integers are ties: 17 -> 16 (mantissa 000 even), 19 -> 20 (010), 21 -> 20 (010).
    # e5m2 (absmax 57344) has 2 mantissa bits, step 4 in [16, 32): 17 -> 16 and 19 -> 20
    # (nearest), 22 -> 24 (tie between 20 = mantissa 01 and 24 = mantissa 10 -> even)
    x = t([448.0, 17.0, 19.0, 21.0])
    assert torch.equal(fake_quantize(x, E4M3), t([448.0, 16.0, 20.0, 20.0]))
    x = t([57344.0, 17.0, 19.0, 22.0])
    assert torch.equal(fake_quantize(x, E5M2), t([57344.0, 16.0, 20.0, 24.0]))


@pytest.mark.parametrize("fmt, mant_bits, min_normal_exp", [(E4M3, 3, -6), (E5M2, 2, -14)])
def test_fp8_relative_error_bound_random(fmt, mant_bits, min_normal_exp):
    # round to nearest with m mantissa bits: relative error <= 2^-(m+1)
    # (e4m3: 2^-4, e5m2: 2^-3) for every value in the normal range after scaling;
    # below the normal range (subnormals) the absolute error is <= half a subnormal step.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 64).unsqueeze(1)
    qt = quantize(x, fmt, group_size=64)
    y = qt.dequantize()
    scale = qt.scale.repeat_interleave(64, dim=-1)
    scaled = (x / scale).abs()
    normal = scaled >= 2.0**min_normal_exp
    assert normal.float().mean() > 0.99
    rel = ((y - x).abs() / x.abs())[normal]
    bound = 2.0 ** -(mant_bits + 1)
    assert rel.max().item() <= bound * (1 + 1e-5)
    # the bound is tight-ish: some values do get close to it
    assert rel.max().item() > bound / 2
    sub_step = 2.0 ** (min_normal_exp - mant_bits)
    sub_err = ((y - x).abs() / scale)[~normal]
    assert (sub_err <= sub_step / 2 * (1 + 1e-5)).all()
    # e4m3 is more precise than e5m2
    if fmt is E5M2:
        e4 = (fake_quantize(x, E4M3, 64) - x).abs().mean()
        assert e4 < (y - x).abs().mean()


def test_fp8_saturates_to_format_max_after_scaling():
    x = t([1000.0, -3.0, 1.0])
    qt = quantize(x, E4M3)
    assert qt.scale.item() == pytest.approx(1000.0 / 448.0, rel=1e-7)
    assert qt.q.abs().max().item() == 448.0
    assert set(FP8_DTYPES) == {"fp8_e4m3", "fp8_e5m2"}


# ---------------------------------------------------------------------------- error bounds


def _matrix():
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(1234))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 64])
def test_mean_error_strictly_decreases_with_bits(sym, group_size):
    w = _matrix()
    errors = [(fake_quantize(w, QuantFormat(b, "int", sym), group_size) - w).abs().mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # one more bit roughly halves the error in the fine-grained regime
    assert errors[-2] / errors[-1] == pytest.approx(2.0, rel=0.25)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_max_error_at_most_half_scale_per_group(sym, bits):
    w = _matrix()
    fmt = QuantFormat(bits, "int", sym)
    qt = quantize(w, fmt, 32)
    err = (qt.dequantize() - w).abs().reshape(64, 8, 32).amax(dim=-1)
    assert qt.scale.shape == (64, 8)
    assert (err <= qt.scale / 2 * (1 + 1e-4) + 1e-7).all()
    # and not trivially: the worst group comes close to scale/2
    assert (err / qt.scale).max() > 0.45


def test_fake_quantize_is_idempotent_for_int():
    w = _matrix()
    for fmt in (SYM4, ASYM4, QuantFormat(8, "int", True)):
        once = fake_quantize(w, fmt, 32)
        twice = fake_quantize(once, fmt, 32)
        torch.testing.assert_close(twice, once, rtol=0, atol=1e-6)
        assert torch.unique(quantize(w, fmt, 32).q).numel() <= 2**fmt.bits


# ---------------------------------------------------------------------------- quantize_weight


def test_quantize_weight_tensor_granularity():
    # one scale for the whole [2, 2] weight: absmax 7 -> scale 1 (4-bit sym)
    w = t([[7.0, 0.4], [2.6, -1.2]])
    deq, qt = quantize_weight(w, SYM4, "tensor", 128)
    assert qt is None
    assert torch.equal(deq, t([[7.0, 0.0], [3.0, -1.0]]))
    assert deq.dtype == w.dtype


def test_quantize_weight_channel_granularity():
    # one scale per output row: absmax 7 and 1.4 -> scale 1 and 0.2
    w = t([[7.0, 0.4, -3.0], [1.4, -0.3, 0.5]])
    deq, qt = quantize_weight(w, SYM4, "channel", 128)
    assert qt.scale.shape == (2, 1)
    assert qt.group_size == 3
    torch.testing.assert_close(qt.scale[:, 0], t([1.0, 0.2]), rtol=1e-6, atol=0)
    # row 0: [7, 0.4, -3] / 1 -> [7, 0, -3].
    # row 1: scale = fl32(1.4)/7 = 0.2000000030; fl32(-0.3) = -0.3000000119, so
    #   [1.4, -0.3, 0.5] / scale = [7, -1.50000004, 2.49999996] -> [7, -2, 2]
    #   -> x_hat = [1.4, -0.4, 0.4]
    torch.testing.assert_close(deq, t([[7.0, 0.0, -3.0], [1.4, -0.4, 0.4]]), rtol=0, atol=1e-6)


def test_quantize_weight_group_granularity_and_bf16():
    w = _matrix().to(torch.bfloat16)
    deq, qt = quantize_weight(w, ASYM4, "group", 64)
    assert deq.dtype == torch.bfloat16
    assert qt.scale.shape == (64, 4) and qt.zero.shape == (64, 4)
    assert qt.q.shape == (64, 256)
    assert torch.equal(deq, qt.dequantize().to(torch.bfloat16))
    assert torch.equal(deq, fake_quantize(w, ASYM4, 64))


def test_quantize_weight_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(torch.ones(2, 2), SYM4, "row", 4)
    with pytest.raises(ValueError, match="fp8_block"):  # tiles are block FP8's own
        quantize_weight(torch.ones(2, 2), SYM4, "block", 4)


def test_smollm2_width_partial_group():
    # SmolLM2-135M hidden size 576 = 4 * 128 + 64: w4g128 -> 5 groups per row, the last 64 wide
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(7))
    w[:, 512:] *= 0.01  # make the partial group's range very different from the others
    deq, qt = quantize_weight(w, ASYM4, "group", 128)
    assert qt.scale.shape == (8, 5)
    assert qt.zero.shape == (8, 5)
    assert qt.group_size == 128
    torch.testing.assert_close(qt.dequantize(), fake_quantize(w, ASYM4, 128), rtol=0, atol=0)
    assert torch.equal(deq, fake_quantize(w, ASYM4, 128))
    # the partial group's scale comes from its own 64 columns only
    tail = w[:, 512:]
    lo = tail.amin(dim=1).clamp(max=0)
    hi = tail.amax(dim=1).clamp(min=0)
    torch.testing.assert_close(qt.scale[:, 4], (hi - lo) / 15, rtol=1e-6, atol=0)
    # and the tail is quantized as finely as its own range allows
    assert ((deq[:, 512:] - tail).abs() <= qt.scale[:, 4:5] / 2 * (1 + 1e-4)).all()
    # each full group likewise
    for gi in range(4):
        g = w[:, gi * 128 : (gi + 1) * 128]
        expected = (g.amax(1).clamp(min=0) - g.amin(1).clamp(max=0)) / 15
        torch.testing.assert_close(qt.scale[:, gi], expected, rtol=1e-6, atol=0)
