"""GPTQ: lower layer-output reconstruction error than RTN on the same inputs."""

from __future__ import annotations

import pytest
import torch

from qeval.config import QuantSpec, WeightSpec
from qeval.models.adapters import get_adapter
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.gptq import HessianAccumulator, gptq_quantize
from qeval.quant.recipe import get_method


def _correlated_inputs(n: int = 3000, d: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.2 + torch.randn(d, generator=g)


def test_hessian_is_the_running_average_of_2xxT():
    x = _correlated_inputs(500, 32)
    acc = HessianAccumulator(32)
    for chunk in x.split(128):
        acc.add(chunk[None])  # [1, tokens, features] as a linear sees it
    assert acc.tokens == 500
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 500, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity,group_size", [("group", 64), ("group", 80), ("channel", -1)])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bits,sym", [(3, False), (4, True)])
def test_gptq_beats_rtn_on_output_error(granularity, group_size, act_order, static_groups, bits, sym):
    x = _correlated_inputs()
    w = torch.randn(96, x.shape[1], generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    fmt = QuantFormat(bits, "int", sym)
    rtn, _ = quantize_weight(w, fmt, granularity, group_size)
    deq, qt = gptq_quantize(w, acc.H, fmt, granularity, group_size, act_order=act_order, static_groups=static_groups)
    err_rtn = ((x @ (w - rtn).T) ** 2).mean()
    err_gptq = ((x @ (w - deq).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn
    # every value is on the format's grid: codes and scales reproduce the weights exactly
    if qt is not None:
        torch.testing.assert_close(qt.dequantize(), deq, rtol=0, atol=1e-6)
        assert qt.q.min() >= fmt.qmin and qt.q.max() <= fmt.qmax
        assert torch.equal(qt.q, qt.q.round())
        # 192 columns in groups of 80: 80 + 80 + a partial 32
        assert qt.scale.shape == (96, -(-x.shape[1] // (group_size if granularity == "group" else x.shape[1])))
    else:
        assert granularity == "group" and act_order and not static_groups


def test_dead_inputs_get_zero_weight():
    x = _correlated_inputs(1000, 16)
    x[:, 3] = 0
    acc = HessianAccumulator(16)
    acc.add(x)
    deq, _ = gptq_quantize(torch.randn(8, 16), acc.H, QuantFormat(4, "int", False), "channel", -1)
    assert torch.all(deq[:, 3] == 0)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES) + ["olmo2"])  # OLMo 2: GPTQ without norms before its linears
def test_gptq_on_every_family_beats_rtn_on_first_layers(family):
    """Block 0's q/k/v see the same calibration inputs in the FP and quantized model:
    GPTQ's output error on them must be below RTN's."""
    torch.manual_seed(0)
    calib = [torch.randint(3, 259, (1, 64)) for _ in range(8)]
    fp = build_tiny_model(family)
    adapter = get_adapter(fp)
    first = adapter.sequential()[0]
    prefix = f"{adapter.blocks}.0."
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in first}
    hooks = [
        fp.get_submodule(prefix + n).register_forward_pre_hook(
            lambda _m, a, _n=n: inputs[_n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in first
    ]
    with torch.no_grad():
        for b in calib:
            fp(b)
    for h in hooks:
        h.remove()

    spec = QuantSpec(name="w3g32", w=WeightSpec(bits=3, granularity="group", group_size=32))
    errors = {}
    for method in ("rtn", "gptq"):
        model = build_tiny_model(family)
        quantize_model(model, spec, get_method(method), calibration=lambda: calib)
        for n in first:
            layer = model.get_submodule(prefix + n)
            assert isinstance(layer, QuantLinear)
            x = torch.cat(inputs[n])
            ref = fp.get_submodule(prefix + n).weight
            errors[method, n] = ((x @ (ref - layer.weight).T) ** 2).mean().item()
    for n in first:
        assert errors["gptq", n] < errors["rtn", n], (family, n, errors)
