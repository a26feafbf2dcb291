"""QuaRot: Hadamard constructions, exact rotation in full precision, and what rotation buys."""

from __future__ import annotations

import pytest
import torch
from conftest import outlier_llama

from qeval.config import ActivationSpec, QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.hadamard import hadamard, random_rotation
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.quarot import rotate_model
from qeval.quant.recipe import get_method

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3", "granite"]
CALIB = [torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 640, 896, 1536, 4864])
def test_hadamard_orders_of_real_models(n):
    H = hadamard(n)
    assert H is not None
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_rotation_falls_back_to_random_orthogonal():
    assert hadamard(100) is None  # 100 = 4 * 25: no Sylvester/Paley construction here
    R = random_rotation(100, seed=3)
    torch.testing.assert_close(R @ R.T, torch.eye(100, dtype=torch.float64))
    assert not torch.equal(random_rotation(100, seed=3), random_rotation(100, seed=4))


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_leaves_logits_unchanged(family):
    ref, model = build_tiny_model(family), build_tiny_model(family)
    rotate_model(model, seed=0)
    assert not torch.allclose(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES) - set(ROTATABLE)))
def test_unrotatable_families_are_refused_by_name(family):
    spec = QuantSpec(name="w4a4", w=WeightSpec(bits=4, granularity="channel", sym=True), a=ActivationSpec(bits=4))
    model = build_tiny_model(family)
    with pytest.raises(UnsupportedCellError, match=model.config.model_type):
        quantize_model(model, spec, get_method("quarot"))


def test_down_proj_keeps_its_online_rotation_after_quantization():
    spec = QuantSpec(name="w8a8", w=WeightSpec(bits=8, granularity="channel", sym=True), a=ActivationSpec(bits=8))
    model = quantize_model(build_tiny_model("llama"), spec, get_method("quarot"))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.input_transform is not None
    n = down.in_features
    torch.testing.assert_close(
        down.input_transform.double() @ down.input_transform.double().T,
        torch.eye(n, dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("method", ["quarot", "quarot_gptq"])
def test_rotation_beats_rtn_for_w4a4_with_outlier_channels(method):
    spec = QuantSpec(name="w4a4", w=WeightSpec(bits=4, granularity="channel", sym=True), a=ActivationSpec(bits=4))
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = outlier_llama(30.0)(x).logits
        err = {}
        for name in ("rtn", method):
            m = quantize_model(outlier_llama(30.0), spec, get_method(name), calibration=lambda: CALIB)
            err[name] = (m(x).logits - ref).pow(2).mean().item()
    assert err[method] < 0.7 * err["rtn"], err
