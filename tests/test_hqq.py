"""HQQ: calibration-free zero-point optimization lowers the weight error below RTN's."""

from __future__ import annotations

import pytest
import torch

from qeval.config import QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.tiny import build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.hqq import hqq_quantize, shrink_lp
from qeval.quant.recipe import get_method


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 512, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.01] *= 6  # sparse outliers, as in trained LLMs
    return w


def test_shrinkage_is_the_lp_soft_threshold():
    # p = 1: soft threshold by 1/beta; p < 1: small entries shrink to zero, large ones barely move
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    torch.testing.assert_close(shrink_lp(x, 10.0, 1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    out = shrink_lp(x, 10.0, 0.7)
    assert out[1] == 0 and out[3] == 0 and out[2] == 0
    assert out[4].item() == pytest.approx(2 - 2**-0.3 / 10)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (4, 128), (2, 32)])
def test_hqq_lowers_the_weight_error_below_rtn(bits, group):
    w = _weights()
    fmt = QuantFormat(bits, "int", sym=False)
    rtn, _ = quantize_weight(w, fmt, "group", group)
    deq, qt = hqq_quantize(w, fmt, group)
    mae = lambda x: (x - w).abs().mean().item()  # noqa: E731 - HQQ's own stopping criterion
    assert mae(deq) < mae(rtn)
    if bits >= 3:  # and the squared error too, except at 2 bits where the l_0.7 fit trades it
        assert ((deq - w) ** 2).mean() < ((rtn - w) ** 2).mean()
    # the result is a grid: integer codes in range, real zero points, dequantize() reproduces it
    assert torch.equal(qt.q, qt.q.round()) and qt.q.min() >= 0 and qt.q.max() <= fmt.qmax
    torch.testing.assert_close(qt.dequantize(), deq, rtol=0, atol=1e-6)
    assert not torch.equal(qt.zero, qt.zero.round())


def test_early_stop_never_keeps_a_worse_zero_point():
    w = _weights(1)
    fmt = QuantFormat(4, "int", sym=False)
    errors = [(hqq_quantize(w, fmt, 64, iters=n)[0] - w).abs().mean().item() for n in (1, 5, 20)]
    assert errors[0] >= errors[1] >= errors[2]


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "qwen3_moe"])
def test_hqq_quantizes_every_linear_and_expert_without_data(family):
    spec = QuantSpec("w4g32", w=WeightSpec(4, "int", "group", 32, False))
    model = build_tiny_model(family)
    quantize_model(model, spec, get_method("hqq"))  # no calibration argument: none needed
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qweight is not None and m.qweight.zero is not None for m in linears)
    from qeval.quant.coverage import QUANTIZED_PARAMS_ATTR
    from qeval.quant.experts import find_fused_experts

    fused = find_fused_experts(model)
    assert bool(fused) == (family != "llama")
    for experts in fused:  # every fused tensor optimized by HQQ, per expert, and recorded so
        marks = getattr(model.get_submodule(experts.path), QUANTIZED_PARAMS_ATTR)
        assert {p.name for p in experts.params} <= set(marks)
        assert all("HQQ per expert" in marks[p.name] for p in experts.params)


@pytest.mark.parametrize(
    "w",
    [
        WeightSpec(4, "int", "group", 32, True),
        WeightSpec(4, "nvfp4", "group", 16, True),
        WeightSpec(4, "int", "tensor"),
    ],
)
def test_hqq_refuses_what_it_cannot_optimize(w):
    with pytest.raises(UnsupportedCellError, match="hqq optimizes the zero points"):
        quantize_model(build_tiny_model("llama"), QuantSpec("x", w=w), get_method("hqq"))
