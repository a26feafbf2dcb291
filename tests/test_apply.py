"""quantize_model: which modules get quantized, what stays bitwise untouched, calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
from qeval.models.tiny import VOCAB_SIZE, build_tiny_model
from qeval.quant.apply import quantize_model, target_linears
from qeval.quant.formats import QuantFormat, fake_quantize
from qeval.quant.linear import ActivationQuantizer, QuantLinear
from qeval.quant.methods import METHODS, UnsupportedCellError
from qeval.quant.recipe import get_method

N_LINEARS = 14  # tiny llama: 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp_model():
    return build_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def fp_logits(fp_model, input_ids):
    with torch.no_grad():
        return fp_model(input_ids).logits


def _w(bits, granularity="group", group_size=32, sym=False, fmt="int"):
    return WeightSpec(bits=bits, format=fmt, granularity=granularity, group_size=group_size, sym=sym)


def _quantized(spec, calibration=None):
    model = build_tiny_model("llama", seed=0)
    return quantize_model(model, spec, get_method("rtn"), calibration)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _calib():
    return [torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(5))]


def test_w4_group_replaces_every_linear_but_lm_head(fp_model, fp_logits, input_ids):
    spec = QuantSpec(name="w4g32", w=_w(4))
    model = _quantized(spec)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert len(quant) == N_LINEARS
    assert plain == {"lm_head"}
    assert all(n.startswith("model.layers.") for n in quant)
    # lm_head and the (tied) embedding are bitwise the original ones
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, fp_model.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.weight, fp_model.lm_head.weight)
    assert model.lm_head.weight is emb  # still tied
    # norms are untouched too
    assert torch.equal(model.model.norm.weight, fp_model.model.norm.weight)
    # every QuantLinear holds the RTN weight of the original linear, with 2 groups of 32
    fmt = QuantFormat(4, "int", False)
    for name, ql in quant.items():
        orig = fp_model.get_submodule(name).weight
        assert torch.equal(ql.weight, fake_quantize(orig, fmt, 32))
        assert not torch.equal(ql.weight, orig)
        assert ql.qweight.scale.shape == (orig.shape[0], orig.shape[1] // 32)
        assert ql.input_quantizer is None
    down = quant["model.layers.0.mlp.down_proj"]
    assert down.qweight.scale.shape == (64, 5)  # in_features 160 = 5 groups of 32
    logits = _logits(model, input_ids)
    assert (logits - fp_logits).abs().max() > 1e-2
    assert torch.isfinite(logits).all()


def test_more_bits_closer_to_fp(fp_logits, input_ids):
    err = {}
    for bits in (3, 4, 8):
        logits = _logits(_quantized(QuantSpec(w=_w(bits))), input_ids)
        err[bits] = (logits - fp_logits).abs().mean().item()
    assert err[8] < err[4] < err[3], err
    assert err[8] < err[3] / 10, err


def test_fp_spec_changes_nothing(fp_logits, input_ids):
    model = _quantized(QuantSpec(name="fp16"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(_logits(model, input_ids), fp_logits)


def test_target_linears_excludes_head_unless_asked(fp_model):
    assert "lm_head" not in target_linears(fp_model)
    assert len(target_linears(fp_model)) == N_LINEARS
    assert "lm_head" in target_linears(fp_model, quantize_lm_head=True)


def test_quantize_embeddings_unties_head(fp_model, fp_logits, input_ids):
    spec = QuantSpec(w=_w(4), quantize_embeddings=True, quantize_lm_head=False)
    model = _quantized(spec)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    orig = fp_model.get_input_embeddings().weight
    assert head is not emb
    # the head keeps the original (float) embedding values
    assert torch.equal(head, orig)
    assert type(model.get_output_embeddings()) is nn.Linear
    # the input embedding is quantized row by row with the weight spec
    assert torch.equal(emb, fake_quantize(orig, QuantFormat(4, "int", False), 32))
    assert not torch.equal(emb, orig)
    assert not torch.equal(_logits(model, input_ids), fp_logits)


def test_quantize_lm_head(fp_model):
    spec = QuantSpec(w=_w(4), quantize_lm_head=True)
    model = _quantized(spec)
    assert isinstance(model.lm_head, QuantLinear)
    fmt = QuantFormat(4, "int", False)
    assert torch.equal(model.lm_head.weight, fake_quantize(fp_model.lm_head.weight, fmt, 32))
    # the input embedding is not quantized
    assert torch.equal(model.get_input_embeddings().weight, fp_model.get_input_embeddings().weight)


def test_dynamic_activation_quantizers_installed(fp_logits, input_ids):
    spec = QuantSpec(w=_w(8, "channel", sym=True), a=ActivationSpec(bits=8, granularity="token"))
    model = _quantized(spec)
    aqs = [m.input_quantizer for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(aqs) == N_LINEARS
    assert all(isinstance(a, ActivationQuantizer) and a.dynamic and a.fmt.bits == 8 for a in aqs)
    w_only = _logits(_quantized(QuantSpec(w=_w(8, "channel", sym=True))), input_ids)
    wa = _logits(model, input_ids)
    assert not torch.equal(wa, w_only)
    # W8A8 stays close to FP on this model but is not identical
    assert 0 < (wa - fp_logits).abs().max() < 1.0


def test_static_activation_quantization_calibrates():
    seen = []

    def calibration():
        seen.append(1)
        return _calib()

    spec = QuantSpec(w=_w(8, "channel", sym=True), a=ActivationSpec(bits=8, granularity="tensor", dynamic=False))
    model = _quantized(spec, calibration)
    assert seen  # the calibration data was asked for
    aqs = [m.input_quantizer for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(aqs) == N_LINEARS
    for aq in aqs:
        assert not aq.dynamic
        assert not aq.observing
        assert aq.scale is not None and aq.scale.numel() == 1
        absmax = torch.maximum(aq.obs_max.clamp(min=0), -aq.obs_min.clamp(max=0))
        assert aq.obs_max > aq.obs_min
        assert aq.scale.item() == pytest.approx(absmax.item() / 127, rel=1e-6)
        assert aq.scale.item() > 0
    # different layers see different ranges -> different frozen scales
    assert len({round(aq.scale.item(), 8) for aq in aqs}) > 1
    # and the frozen model runs
    logits = _logits(model, torch.randint(3, 259, (1, 16)))
    assert torch.isfinite(logits).all()


def test_static_activation_needs_calibration():
    spec = QuantSpec(w=_w(8, "channel", sym=True), a=ActivationSpec(bits=8, granularity="tensor", dynamic=False))
    with pytest.raises(ValueError, match="calibration"):
        _quantized(spec, None)


def test_kv_spec_installs_cache_quantization(fp_logits, input_ids):
    model = _quantized(QuantSpec(kv=KVSpec(bits=4)))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert (_logits(model, input_ids) - fp_logits).abs().max() > 1e-3
    model16 = _quantized(QuantSpec(kv=KVSpec(bits=16)))
    assert torch.equal(_logits(model16, input_ids), fp_logits)


def test_unsupported_tensor_type_raises_before_work():
    class WeightOnly(METHODS["rtn"]):
        name = "weight-only-test"
        tensor_types = frozenset({"W"})

    spec = QuantSpec(w=_w(4), a=ActivationSpec(bits=8))
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(UnsupportedCellError, match="WA"):
        quantize_model(model, spec, WeightOnly())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
