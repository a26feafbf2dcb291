"""Microscaling formats (NVFP4, MXFP4, MXFP8) and block FP8 against the specs.

The reference quantizers here are written from the specs, value by value, with no code in
common with qeval.quant.formats: the E2M1 and E4M3 value sets are enumerated (E4M3 from its
bit patterns), rounding is "nearest, ties to the even code", and the scales follow

* OCP Microscaling Formats v1.0: per block of 32, X = 2^(floor(log2(max|v|)) - emax_elem),
  emax_elem = 2 (E2M1) or 8 (E4M3); elements v / X rounded and clamped to the element's
  largest normal;
* NVFP4: s_tensor = max|W| / (6 * 448); per block of 16, s_block = e4m3(max|v| / 6 / s_tensor);
  elements v / (s_block * s_tensor) rounded to E2M1;
* block FP8 (DeepSeek-V3): one FP32 scale max|tile| / 448 per 128 x 128 tile.
"""

from __future__ import annotations

import math

import pytest
import torch

from qeval.config import ActivationSpec, ConfigError, KVSpec, QuantSpec, WeightSpec, validate_quant
from qeval.models.tiny import build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.cache import load_quantized, save_quantized
from qeval.quant.formats import (
    E2M1_VALUES,
    QuantFormat,
    e8m0_scale,
    fake_quantize,
    quantize,
    quantize_weight,
    round_e2m1,
)
from qeval.quant.kv import KVQuantizer
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.awq import search_clip
from qeval.quant.methods.gptq import HessianAccumulator, gptq_quantize
from qeval.quant.methods.omniquant import lwc_quantize
from qeval.quant.recipe import get_method

NVFP4 = QuantFormat(4, "nvfp4")
MXFP4 = QuantFormat(4, "mxfp4")
MXFP8 = QuantFormat(8, "mxfp8")
FP8_BLOCK = QuantFormat(8, "fp8_block")


# ---------------------------------------------------------------------------- reference, from the specs


def _e4m3_values() -> list[float]:
    """Every finite non-negative E4M3 value, in code order (sign bit 0; 0x7F is NaN)."""
    values = []
    for code in range(0x7F):
        exp, man = code >> 3, code & 7
        values.append(man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return values


E4M3_VALUES = _e4m3_values()
assert E4M3_VALUES[-1] == 448.0


def _nearest(v: float, grid: list[float]) -> float:
    """Round |v| to the nearest grid value, ties to the even code, saturating; sign restored."""
    a = abs(v)
    if a >= grid[-1]:
        return math.copysign(grid[-1], v)
    i = max(k for k, g in enumerate(grid) if g <= a)
    lo, hi = grid[i], grid[i + 1]
    if a - lo < hi - a:
        pick = lo
    elif a - lo > hi - a:
        pick = hi
    else:
        pick = lo if i % 2 == 0 else hi
    return math.copysign(pick, v) if pick else 0.0


def ref_mx(row: list[float], grid: list[float], emax: int, block: int = 32) -> list[float]:
    out = []
    for start in range(0, len(row), block):
        vals = row[start : start + block]
        amax = max(abs(v) for v in vals)
        x = 2.0 ** (math.floor(math.log2(amax)) - emax) if amax > 0 else 2.0**-127
        out += [_nearest(v / x, grid) * x for v in vals]
    return out


def ref_nvfp4(w: list[list[float]]) -> list[list[float]]:
    s_tensor = max(abs(v) for row in w for v in row) / (6 * 448)
    out = []
    for row in w:
        deq = []
        for start in range(0, len(row), 16):
            vals = row[start : start + 16]
            s_block = _nearest(max(abs(v) for v in vals) / 6 / s_tensor, E4M3_VALUES)
            scale = s_block * s_tensor
            deq += [_nearest(v / scale, list(E2M1_VALUES)) * scale if scale else 0.0 for v in vals]
        out.append(deq)
    return out


def _random(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy tails and a spread of block magnitudes, so scales differ block to block
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).mul(4).exp2()


# ---------------------------------------------------------------------------- known values


def test_e2m1_value_set_round_trips_and_ties_go_to_even():
    grid = torch.tensor(E2M1_VALUES)
    assert torch.equal(round_e2m1(grid), grid) and torch.equal(round_e2m1(-grid), -grid)
    # midpoints: 0.25 -> 0 (code 0), 0.75 -> 1 (code 2), 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_e2m1(mids).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_e2m1(-mids).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    # nearest away from ties, saturation beyond 6
    assert round_e2m1(torch.tensor([0.26, 0.74, 2.6, 5.1, 7.0, 1e9, -100.0])).tolist() == [
        0.5,
        0.5,
        3.0,
        6.0,
        6.0,
        6.0,
        -6.0,
    ]


@pytest.mark.parametrize(
    "amax,scale,dequantized_max",
    [
        # floor(log2 0.1) = -4 -> 2^(-4-2); 0.1 / 2^-6 = 6.4 saturates to 6 -> 0.09375
        (0.1, 2.0**-6, 0.09375),
        (1.0, 2.0**-2, 1.0),  # 1 / 0.25 = 4, on the grid
        (6.0, 1.0, 6.0),
        (100.0, 2.0**4, 96.0),  # floor(log2 100) = 6 -> 16; 100 / 16 = 6.25 -> 6
    ],
)
def test_e8m0_scale_selection_on_block_maxima(amax, scale, dequantized_max):
    block = torch.full((1, 32), amax / 10)
    block[0, 0] = amax
    assert e8m0_scale(torch.tensor([amax]), MXFP4).item() == scale
    qt = quantize(block, MXFP4)
    assert qt.scale.item() == scale and qt.group_size == 32
    assert qt.dequantize()[0, 0].item() == pytest.approx(dequantized_max)
    assert math.log2(qt.scale.item()).is_integer()  # E8M0: a power of two
    # MXFP8's element emax is 8: scale 2^(floor(log2 amax) - 8)
    assert quantize(block, MXFP8).scale.item() == 2.0 ** (math.floor(math.log2(amax)) - 8)


def test_nvfp4_scale_of_scales():
    # tensor absmax 2688 = 6 * 448 -> tensor scale 1; a block of max 6 -> block scale 1 exactly;
    # a block of max 3.3 -> 3.3 / 6 = 0.55 -> E4M3 0.5625 (1.125 * 2^-1); the last block is zero
    w = torch.zeros(1, 48)
    w[0, 0], w[0, 1] = 2688.0, 6.0
    w[0, 16], w[0, 17] = 3.3, -1.0
    qt = quantize(w, NVFP4)
    assert qt.tensor_scale.item() == 1.0
    assert qt.scale.tolist()[0] == [448.0, 0.5625, 0.0]
    assert torch.equal(qt.scale, qt.scale.to(torch.float8_e4m3fn).float())  # block scales are E4M3 values
    deq = qt.dequantize()
    # 3.3 / 0.5625 = 5.87 -> 6 -> 3.375; -1 / 0.5625 = -1.78 -> -2 -> -1.125
    assert deq[0, 16].item() == pytest.approx(3.375) and deq[0, 17].item() == pytest.approx(-1.125)
    assert torch.equal(deq[0, 32:], torch.zeros(16))
    # scaled down by 2^-10: the tensor scale follows, block scales and codes are unchanged
    small = quantize(w * 2.0**-10, NVFP4)
    assert small.tensor_scale.item() == pytest.approx(2.0**-10) and torch.equal(small.scale, qt.scale)


def test_fp8_block_tiles_have_one_scale_each():
    w = torch.ones(200, 300)
    w[0, 0] = 448.0 * 3  # tile (0, 0)
    w[150, 290] = -448.0 * 0.5  # tile (1, 2): a partial tile at both edges
    deq, qt = quantize_weight(w, FP8_BLOCK, "block", 128)
    assert qt.scale.shape == (2, 3) and qt.block_rows == 128
    assert qt.scale[0, 0].item() == pytest.approx(3.0)
    assert qt.scale[1, 2].item() == pytest.approx(0.5)  # max |v| = 224 in the partial tile
    assert qt.scale[0, 1].item() == pytest.approx(1 / 448)
    torch.testing.assert_close(deq, qt.dequantize())
    assert deq[0, 0].item() == w[0, 0].item() and deq[150, 290].item() == w[150, 290].item()
    assert torch.allclose(deq[1:128, 1:128], torch.full((127, 127), 1.0), atol=3 / 16)


# ---------------------------------------------------------------------------- equivalence to the reference


@pytest.mark.parametrize("fmt,grid,emax", [(MXFP4, list(E2M1_VALUES), 2), (MXFP8, E4M3_VALUES, 8)])
def test_mx_fake_quantization_equals_the_spec(fmt, grid, emax):
    w = _random(6, 96)
    ours = fake_quantize(w, fmt)
    ref = torch.tensor([ref_mx(row, grid, emax) for row in w.tolist()])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_nvfp4_fake_quantization_equals_the_spec():
    w = _random(5, 64, seed=3)
    w[2, 16:32] *= 1e-6  # a tiny block: its E4M3 scale is subnormal or zero
    ours = fake_quantize(w, NVFP4)
    ref = torch.tensor(ref_nvfp4(w.tolist()))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_bounded_error_and_format_ordering():
    """Relative error bounds of each format, and the ordering they imply on Gaussian weights:
    MXFP8 < NVFP4 < MXFP4 (NVFP4's finer blocks and E4M3 scales beat MX's power-of-two scales)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = {f.kind: ((fake_quantize(w, f) - w).norm() / w.norm()).item() for f in (NVFP4, MXFP4, MXFP8)}
    assert err["mxfp8"] < 0.05 < err["nvfp4"] < err["mxfp4"] < 0.2, err


def test_activation_blocks_follow_the_hidden_dimension():
    x = _random(2 * 7, 64, seed=5).reshape(2, 7, 64)
    out = fake_quantize(x, MXFP4)
    for b in range(2):
        for t in range(7):
            torch.testing.assert_close(out[b, t], fake_quantize(x[b, t][None], MXFP4)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------- the methods round to the grids


def _on_grid(deq: torch.Tensor, qt) -> bool:
    codes = qt.q
    if qt.fmt.element == "e2m1":
        grid = torch.tensor(E2M1_VALUES)
        on = torch.isin(codes.abs(), grid)
    else:
        on = codes == codes.to(torch.float8_e4m3fn).float()
    return bool(on.all()) and torch.allclose(qt.dequantize(), deq.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt,granularity,gs", [(NVFP4, "group", 16), (MXFP4, "group", 32), (FP8_BLOCK, "block", 128)])
def test_gptq_rounds_to_the_grid_and_beats_rtn(fmt, granularity, gs):
    g = torch.Generator().manual_seed(0)
    d = 256
    x = torch.randn(2000, d, generator=g) @ torch.randn(d, d, generator=g) * 0.2
    w = torch.randn(192, d, generator=g)
    acc = HessianAccumulator(d)
    acc.add(x)
    deq, qt = gptq_quantize(w, acc.H, fmt, granularity, gs)
    rtn, _ = quantize_weight(w, fmt, granularity, gs)
    assert qt is not None and _on_grid(deq, qt)
    err = lambda q: ((x @ (q - w).T) ** 2).mean().item()  # noqa: E731
    assert err(deq) < err(rtn)
    if fmt.kind == "nvfp4":  # GPTQ keeps RTN's tensor scale (from the original weight)
        assert qt.tensor_scale.item() == quantize(w, fmt).tensor_scale.item()


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, MXFP8])
def test_awq_clip_search_on_fp_grids_never_raises_the_error(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(64, 128, generator=g)
    w[:, 5] *= 8  # an outlier column
    clipped = search_clip(x, w, fmt, fmt.block)
    err = lambda q: ((x @ (q - w).T) ** 2).mean().item()  # noqa: E731
    assert err(fake_quantize(clipped, fmt)) <= err(fake_quantize(w, fmt)) + 1e-9


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4])
def test_lwc_on_fp_grids_is_rtn_when_saturated_and_learns(fmt):
    w = _random(32, 64, seed=2)
    gs = fmt.block
    shape = (32, 64 // gs)
    big = torch.full(shape, 30.0)  # sigmoid -> 1: no clipping
    deq, scale, zero, codes = lwc_quantize(w, big, big, fmt, gs)
    torch.testing.assert_close(deq, fake_quantize(w, fmt), rtol=1e-6, atol=1e-7)
    assert zero is None and torch.isin(codes.abs(), torch.tensor(E2M1_VALUES)).all()
    gamma = torch.full(shape, 2.0, requires_grad=True)
    deq, *_ = lwc_quantize(w, gamma, gamma.detach(), fmt, gs)
    ((deq - w) ** 2).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- whole models


SPECS = {
    "w4a16-nvfp4": QuantSpec("w4a16-nvfp4", w=WeightSpec(4, "nvfp4", "group", 16, True)),
    "w4a4-mxfp4": QuantSpec(
        "w4a4-mxfp4", w=WeightSpec(4, "mxfp4", "group", 32, True), a=ActivationSpec(4, "mxfp4", "token")
    ),
    "w8a8-fp8-block": QuantSpec(
        "w8a8-fp8-block", w=WeightSpec(8, "fp8_block", "block", 128, True), a=ActivationSpec(8, "fp8_block", "token")
    ),
}
CALIB = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize(
    "spec,method",
    [
        ("w4a16-nvfp4", "rtn"),
        ("w4a16-nvfp4", "gptq"),
        ("w4a16-nvfp4", "awq"),
        ("w4a4-mxfp4", "gptq"),
        ("w4a4-mxfp4", "quarot"),
        ("w8a8-fp8-block", "rtn"),
        ("w4a16-nvfp4", "omniquant"),
    ],
)
def test_every_linear_is_on_the_grid(spec, method):
    """Each method's weights are the format's codes times its scales, the activations quantized
    per token in blocks; the model still predicts close to the full-precision one."""
    torch.manual_seed(0)
    fp = build_tiny_model("llama")
    model = build_tiny_model("llama")
    params = {"epochs": 1} if method == "omniquant" else None
    quantize_model(model, SPECS[spec], get_method(method, params), calibration=lambda: CALIB)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears
    for lin in linears:
        assert lin.qweight is not None and lin.qweight.fmt.kind == SPECS[spec].w.format
        assert _on_grid(lin.weight.data, lin.qweight)
        if SPECS[spec].a.bits != 16:
            assert lin.input_quantizer is not None and lin.input_quantizer.fmt.kind == SPECS[spec].a.format
    # and it still computes: closer to the full-precision model than int2 per-channel RTN is
    coarse = build_tiny_model("llama")
    quantize_model(coarse, QuantSpec("w2", w=WeightSpec(2, "int", "channel", -1, True)), get_method("rtn"))
    with torch.no_grad():
        p = fp(CALIB[0]).logits.log_softmax(-1)
        kld = {
            name: torch.nn.functional.kl_div(m(CALIB[0]).logits.log_softmax(-1), p, log_target=True, reduction="sum")
            for name, m in (("ours", model), ("w2", coarse))
        }
    assert 0 < kld["ours"] < kld["w2"], kld


def test_quantized_model_cache_keeps_tensor_and_tile_scales(tmp_path):
    for name in ("w4a16-nvfp4", "w8a8-fp8-block"):
        model = build_tiny_model("llama")
        quantize_model(model, SPECS[name], get_method("rtn"))
        save_quantized(model, tmp_path / name)
        again = build_tiny_model("llama")
        assert load_quantized(again, tmp_path / name, SPECS[name])
        for (n, a), (_, b) in zip(model.named_modules(), again.named_modules(), strict=True):
            if isinstance(a, QuantLinear):
                assert isinstance(b, QuantLinear), n
                assert b.qweight.block_rows == a.qweight.block_rows
                if a.qweight.tensor_scale is not None:
                    assert b.qweight.tensor_scale.item() == a.qweight.tensor_scale.item()
                torch.testing.assert_close(b.qweight.dequantize(), a.weight.data.float())


def test_nvfp4_kv_cache_blocks_along_the_head_dimension():
    kvq = KVQuantizer.from_spec(KVSpec(bits=4, format="nvfp4", sym=True, group_size=16))
    keys = _random(2 * 4 * 9, 32, seed=7).reshape(2, 4, 9, 32)  # [batch, heads, tokens, head_dim]
    k, v = kvq(keys, keys * 2)
    torch.testing.assert_close(k, fake_quantize(keys, NVFP4), rtol=0, atol=0)
    qt = quantize(keys, NVFP4)
    assert qt.scale.shape == (2, 4, 9, 2)  # two blocks of 16 per head and token
    torch.testing.assert_close(v, 2 * k, rtol=1e-6, atol=0)  # the tensor scale absorbs the factor


# ---------------------------------------------------------------------------- refused specs


@pytest.mark.parametrize(
    "spec,key,allowed",
    [
        (QuantSpec(w=WeightSpec(4, "nvfp4", "group", 128, True)), "quant.w.group_size=128", "16 for format nvfp4"),
        (QuantSpec(w=WeightSpec(4, "mxfp4", "channel", 32, True)), "quant.w.granularity='channel'", "group"),
        (QuantSpec(w=WeightSpec(8, "fp8_block", "group", 128, True)), "quant.w.granularity='group'", "128 x 128"),
        (QuantSpec(w=WeightSpec(4, "int", "block", 128)), "quant.w.granularity='block'", "tensor, channel or group"),
        (QuantSpec(w=WeightSpec(8, "nvfp4", "group", 16, True)), "quant.w.bits=8", "4 for format nvfp4"),
        (
            QuantSpec(w=WeightSpec(4, "nvfp4", "group", 16, True), a=ActivationSpec(4, "nvfp4", "tensor", False)),
            "quant.a.granularity='tensor'",
            "token for format nvfp4",
        ),
        (QuantSpec(kv=KVSpec(8, "fp8_block")), "quant.kv.format='fp8_block'", "nvfp4"),
        (QuantSpec(kv=KVSpec(4, "nvfp4", key_granularity="channel")), "quant.kv.key_granularity", "token"),
        (QuantSpec(kv=KVSpec(4, "nvfp4", group_size=32)), "quant.kv.group_size=32", "-1 or 16"),
        (QuantSpec(kv=KVSpec(4, "mxfp4", semantics="cache")), "quant.kv.semantics", "fake"),
    ],
)
def test_inexpressible_specs_are_refused_naming_the_key(spec, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate_quant(spec)
    assert key in str(err.value) and allowed in str(err.value)


def test_bits_per_weight_count_each_formats_scales():
    assert SPECS["w4a16-nvfp4"].weight_bits_per_param == 4.5
    assert SPECS["w4a4-mxfp4"].weight_bits_per_param == 4.25
    assert SPECS["w8a8-fp8-block"].weight_bits_per_param == pytest.approx(8 + 32 / 128**2)
    from qeval.report.frames import weight_bits_per_param

    for spec in SPECS.values():
        assert weight_bits_per_param(spec.label) == pytest.approx(spec.weight_bits_per_param)
