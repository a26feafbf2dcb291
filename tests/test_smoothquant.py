"""SmoothQuant: the rescaling is exact in full precision, and it moves outliers into weights."""

from __future__ import annotations

import pytest
import torch
from conftest import outlier_llama

from qeval.config import ActivationSpec, QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import get_adapter
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.methods.smoothquant import smooth_model, smoothing_scales
from qeval.quant.recipe import get_method

CALIB = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_scales_follow_the_formula():
    act = torch.tensor([4.0, 1.0, 0.25])
    wmax = torch.tensor([1.0, 4.0, 1.0])
    torch.testing.assert_close(smoothing_scales(act, wmax, 0.5), torch.tensor([2.0, 0.5, 0.5]))
    torch.testing.assert_close(smoothing_scales(act, wmax, 1.0), act)
    torch.testing.assert_close(smoothing_scales(act, wmax, 0.0), 1 / wmax)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_smoothing_leaves_logits_unchanged(family):
    ref, model = build_tiny_model(family), build_tiny_model(family)
    smooth_model(model, CALIB, alpha=0.5)
    adapter = get_adapter(model)
    for group in adapter.norm_groups:  # something really moved
        name = f"{adapter.blocks}.0.{group.norm}.weight"
        assert not torch.allclose(model.get_parameter(name), ref.get_parameter(name))
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


def test_smoothing_flattens_activation_channels():
    """After smoothing with alpha=1, the inputs of q/k/v have max |x_j| = 1 in every channel."""
    model = build_tiny_model("llama")
    smooth_model(model, CALIB, alpha=1.0)
    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in CALIB:
            model(b)
    h.remove()
    chan_max = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).abs().amax(dim=0)
    torch.testing.assert_close(chan_max, torch.ones_like(chan_max), rtol=1e-3, atol=1e-3)


def test_weight_only_spec_is_refused():
    spec = QuantSpec(name="w4", w=WeightSpec(bits=4, granularity="channel"))
    with pytest.raises(UnsupportedCellError, match="does not support tensor type W"):
        quantize_model(build_tiny_model("llama"), spec, get_method("smoothquant"), calibration=lambda: CALIB)


def test_w4a4_smoothquant_beats_rtn_on_a_model_with_outlier_channels():
    """Give one hidden channel a large scale (the outlier pattern of real LLMs): per-token
    activation quantization then suffers, and smoothing recovers most of it."""
    spec = QuantSpec(
        name="w8a4",
        w=WeightSpec(bits=8, granularity="channel", sym=True),
        a=ActivationSpec(bits=4, granularity="token", sym=True),
    )

    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = outlier_llama(40.0)(x).logits
        errs = {}
        for method in ("rtn", "smoothquant"):
            m = quantize_model(outlier_llama(40.0), spec, get_method(method), calibration=lambda: CALIB)
            errs[method] = (m(x).logits - ref).pow(2).mean().item()
    assert errs["smoothquant"] < 0.7 * errs["rtn"], errs
