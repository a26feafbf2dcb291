"""OmniQuant's learnable weight clipping: a valid quantizer whose training lowers the block loss."""

from __future__ import annotations

import pytest
import torch

from qeval.config import ActivationSpec, QuantSpec, WeightSpec
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.omniquant import LWCLinear
from qeval.quant.recipe import get_method

CALIB = [torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
W3G32 = QuantSpec(name="w3g32", w=WeightSpec(bits=3, granularity="group", group_size=32))


@pytest.mark.parametrize("sym", [False, True])
def test_lwc_with_saturated_factors_is_rtn(sym):
    """With sigmoid(gamma) = sigmoid(beta) = 1 the learnable range is the full range: RTN."""
    lin = torch.nn.Linear(80, 16)
    fmt = QuantFormat(4, "int", sym)
    lwc = LWCLinear(lin, fmt, 32, init=30.0)
    deq, scale, zero, codes = lwc.quantized()
    rtn, qt = quantize_weight(lin.weight.data, fmt, "group", 32)
    torch.testing.assert_close(deq, rtn, rtol=0, atol=1e-6)
    assert scale.shape == (16, 3)  # 80 columns: 32 + 32 + a partial 16
    assert torch.equal(codes, qt.q)


def test_lwc_gradients_reach_the_clipping_factors():
    lin = torch.nn.Linear(64, 8)
    lwc = LWCLinear(lin, QuantFormat(3, "int", False), 32)
    lwc(torch.randn(4, 64)).pow(2).sum().backward()
    assert lwc.gamma.grad is not None and lwc.gamma.grad.abs().sum() > 0
    assert lwc.beta.grad is not None and lwc.beta.grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_training_lowers_the_block_loss_on_every_family(family):
    method = get_method("omniquant", {"epochs": 6, "lwc_lr": 0.01})
    model = quantize_model(build_tiny_model(family), W3G32, method, calibration=lambda: CALIB)
    assert sorted(method.rounding.loss_history) == [0, 1]
    for block, losses in method.rounding.loss_history.items():
        assert len(losses) == 6
        assert losses[-1] < losses[0], (family, block, losses)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.qweight is not None for m in layers)
    for m in layers:  # the frozen weights are exactly what the stored codes and scales say
        torch.testing.assert_close(m.qweight.dequantize(), m.weight.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_let_transformation_is_exact_before_rounding(family):
    """With LET parameters at arbitrary values and no rounding (LWC factors saturated, 16-bit
    grid), folding the learned scales/shifts into norms and weights keeps the function."""
    from qeval.models.adapters import get_adapter
    from qeval.quant.calibration import BlockInputs, capture_block_inputs
    from qeval.quant.methods.omniquant import LWCLinear, OmniQuant

    ref, model = build_tiny_model(family), build_tiny_model(family)
    adapter = get_adapter(model)
    block = adapter.get_blocks(model)[0]
    hidden, kwargs = capture_block_inputs(model, adapter, CALIB[:2])
    fmt = QuantFormat(16, "int", False)
    wrapped = {n: LWCLinear(block.get_submodule(n), fmt, -1, init=30.0) for n in adapter.block_linears()}
    method = OmniQuant()
    _params, norms = method._init_let(block, adapter, BlockInputs(hidden, kwargs[0]), wrapped)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in _params:  # move away from the initial values
            p.mul_(torch.rand(p.shape, generator=g) + 0.5)
        for let_norm in norms.values():
            if let_norm.shift is not None:
                let_norm.norm.bias.sub_(let_norm.shift)
            from qeval.quant.transforms import fold_into_norm

            fold_into_norm(let_norm.norm, let_norm.scale, adapter.norm_kind)
        for w in wrapped.values():
            weight, bias = w.transformed()
            w.linear.weight.copy_(weight)
            if bias is not None:
                w.linear.bias = torch.nn.Parameter(bias)
    assert norms, family
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_weight_activation_cells_train_let(family):
    spec = QuantSpec(name="w4a4", w=WeightSpec(bits=4, granularity="channel", sym=False), a=ActivationSpec(bits=4))
    method = get_method("omniquant", {"epochs": 4, "lwc_lr": 0.01, "let_lr": 0.001})
    model = quantize_model(build_tiny_model(family), spec, method, calibration=lambda: CALIB)
    for block, losses in method.rounding.loss_history.items():
        assert losses[-1] < losses[0], (family, block, losses)
    assert all(m.input_quantizer is not None for m in model.modules() if isinstance(m, QuantLinear))
