"""Activation quantizers, QuantLinear and KV-cache quantization on every tiny family."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qeval.models.tiny import TINY_FAMILIES, VOCAB_SIZE, build_tiny_model
from qeval.quant.formats import QuantFormat, fake_quantize, quantize_weight
from qeval.quant.kv import KVQuantizer, install_kv_quantization, quantize_cache
from qeval.quant.linear import ActivationQuantizer, QuantLinear

INT8 = QuantFormat(8, "int", True)
SYM4 = QuantFormat(4, "int", True)
FAMILIES = sorted(TINY_FAMILIES)
SEQ = 40  # longer than gemma3-tiny's sliding window (32)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (1, SEQ), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- ActivationQuantizer


def test_dynamic_per_token_equals_rowwise_fake_quantize():
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    x[0, 1] *= 50  # one outlier token must not affect the others
    aq = ActivationQuantizer(INT8, "token", dynamic=True)
    assert not aq.observing
    y = aq(x)
    for b in range(2):
        for s in range(6):
            assert torch.equal(y[b, s], fake_quantize(x[b, s], INT8, None))
    # each token has at most 2^8 levels and its own step absmax/127
    row = x[1, 3]
    step = row.abs().max() / 127
    assert ((y[1, 3] - row).abs() <= step / 2 + 1e-6).all()
    assert not torch.equal(y, x)


def test_dynamic_per_tensor_uses_one_scale():
    # absmax 7 over the whole tensor -> scale 1 at 4 bits: everything rounds to integers
    x = torch.tensor([[7.0, 0.4], [0.2, -1.6]])
    aq = ActivationQuantizer(SYM4, "tensor", dynamic=True)
    assert torch.equal(aq(x), torch.tensor([[7.0, 0.0], [0.0, -2.0]]))


def test_static_per_tensor_observe_freeze_quantize():
    aq = ActivationQuantizer(INT8, "tensor", dynamic=False)
    assert aq.observing and aq.scale is None
    a = torch.tensor([[0.5, -2.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.1], [-0.5, 1.5]])
    # while observing, the input passes through untouched
    assert torch.equal(aq(a), a)
    assert torch.equal(aq(b), b)
    assert aq.obs_min.item() == -2.0 and aq.obs_max.item() == 3.0
    aq.freeze()
    assert not aq.observing
    # sym: scale = max(|min|, |max|) / qmax = 3 / 127
    assert aq.scale.item() == pytest.approx(3.0 / 127, rel=1e-7)
    assert aq.zero is None
    # one scale for everything, also for inputs beyond the observed range (clamped to 127*scale)
    x = torch.tensor([[0.0, 1.0, -3.0, 6.0, 3.0 / 127 * 10.4]])
    y = aq(x)
    s = 3.0 / 127
    expected = torch.tensor([[0.0, round(1.0 / s) * s, -3.0, 127 * s, 10 * s]])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    # a token with tiny values is NOT quantized with its own scale (that is what static means)
    small = torch.tensor([[0.001, -0.002, 0.004]])
    assert torch.equal(aq(small), torch.zeros(1, 3))
    assert not torch.equal(ActivationQuantizer(INT8, "token")(small), torch.zeros(1, 3))


def test_static_asymmetric_freeze_zero_point():
    fmt = QuantFormat(8, "int", False)
    aq = ActivationQuantizer(fmt, "tensor", dynamic=False)
    aq(torch.tensor([-1.0, 0.5, 4.1]))
    aq.freeze()
    # lo=-1, hi=4.1 -> scale 5.1/255 = 0.02, zero = round(1/0.02) = 50
    assert aq.scale.item() == pytest.approx(0.02, rel=1e-6)
    assert aq.zero.item() == 50.0
    y = aq(torch.tensor([0.0, -1.0, 4.1, 0.013]))
    torch.testing.assert_close(y, torch.tensor([0.0, -1.0, 4.1, 0.02]), rtol=0, atol=1e-6)


def test_static_int_all_zero_calibration_stays_finite():
    # int: the frozen scale is clamped to 1e-8, so a layer that only saw zeros stays finite
    aq = ActivationQuantizer(INT8, "tensor", dynamic=False)
    aq(torch.zeros(2, 4))
    aq.freeze()
    assert aq.scale.item() == pytest.approx(1e-8)
    y = aq(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(y).all() and y[0] == 0.0


def test_static_fp8_all_zero_calibration_stays_finite():
    aq = ActivationQuantizer(QuantFormat(8, "fp8_e4m3"), "tensor", dynamic=False)
    aq(torch.zeros(2, 4))
    aq.freeze()
    y = aq(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(y).all()


def test_static_freeze_without_data_fails():
    aq = ActivationQuantizer(INT8, "tensor", dynamic=False)
    with pytest.raises(RuntimeError, match="no calibration data"):
        aq.freeze()


# ---------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_matches_linear_on_dequantized_weight(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24, bias=bias)
    x = torch.randn(3, 5, 48)
    deq, qt = quantize_weight(lin.weight.data, SYM4, "group", 16)
    aq = ActivationQuantizer(INT8, "token")
    ql = QuantLinear(lin, deq, qt, aq)
    assert ql.in_features == 48 and ql.out_features == 24
    assert not ql.weight.requires_grad
    assert torch.equal(ql.weight, deq)
    out = ql(x)
    expected = F.linear(fake_quantize(x, INT8, None), deq, lin.bias)
    assert torch.equal(out, expected)
    # differs from the float layer, and from the weight-only-quantized layer
    assert (out - lin(x)).abs().max() > 1e-3
    assert not torch.equal(out, F.linear(x, deq, lin.bias))
    # weight-only: no input quantizer
    wo = QuantLinear(lin, deq, qt, None)
    assert torch.equal(wo(x), F.linear(x, deq, lin.bias))
    assert "int4 g16" in repr(ql)


# ---------------------------------------------------------------------------- KV cache


class CountingKV(KVQuantizer):
    """A KVQuantizer that records the shape of every key/value state it quantizes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, keys, values):
        self.calls.append((tuple(keys.shape), tuple(values.shape)))
        return super().__call__(keys, values)


@pytest.fixture(scope="module")
def models():
    return {family: build_tiny_model(family, seed=0) for family in FAMILIES}


def _logits(model, ids, quantizer=None):
    handle = install_kv_quantization(model, quantizer) if quantizer is not None else None
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        if handle is not None:
            handle.remove()


def _kv_heads_and_dim(model):
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return heads, head_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_kv16_passthrough_is_exact(models, input_ids, family):
    model = models[family]
    ref = _logits(model, input_ids)
    assert ref.shape == (1, SEQ, VOCAB_SIZE)
    q = CountingKV(bits=16)
    out = _logits(model, input_ids, q)
    assert torch.equal(out, ref)
    # the cache path was really taken: one update per decoder layer
    assert len(q.calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quantization_changes_logits_monotonically(models, input_ids, family):
    model = models[family]
    ref = _logits(model, input_ids)
    diffs = {bits: (_logits(model, input_ids, KVQuantizer(bits=bits)) - ref).abs().max().item() for bits in (8, 4, 2)}
    assert diffs[4] > 1e-3, diffs
    assert diffs[2] > diffs[8], diffs
    assert diffs[2] > diffs[4] > diffs[8] > 0, diffs


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quantizer_sees_keys_of_every_layer(models, input_ids, family):
    model = models[family]
    q = CountingKV(bits=4)
    handle = install_kv_quantization(model, q)
    try:
        with torch.no_grad():
            out = model(input_ids)
            assert len(q.calls) == model.config.num_hidden_layers
            heads, head_dim = _kv_heads_and_dim(model)
            for k_shape, v_shape in q.calls:
                assert k_shape == (1, heads, SEQ, head_dim)
                assert v_shape == (1, heads, SEQ, head_dim)
            # what the cache stores is the quantized keys: 4-bit asym per token and head ->
            # at most 16 distinct values per [token, head] row, and re-quantizing changes nothing
            cache = out.past_key_values
            assert len(cache.layers) == model.config.num_hidden_layers
            for layer in cache.layers:
                for states in (layer.keys, layer.values):
                    rows = states.reshape(-1, states.shape[-1])
                    assert max(torch.unique(r).numel() for r in rows) <= 16
                    torch.testing.assert_close(fake_quantize(states, q.fmt, None), states, rtol=0, atol=1e-5)
            # a second call without a cache gets a fresh one: same logits, 2 more updates
            again = model(input_ids)
            assert torch.equal(again.logits, out.logits)
            assert len(q.calls) == 2 * model.config.num_hidden_layers
    finally:
        handle.remove()
    # the hook is gone after remove()
    with torch.no_grad():
        model(input_ids)
    assert len(q.calls) == 2 * model.config.num_hidden_layers


def test_gemma3_sliding_window_layer_is_kept(models, input_ids):
    # the fresh cache is built from the config, so gemma3's first (sliding) layer only keeps
    # the last sliding_window - 1 tokens while the global layer keeps all 40
    model = models["gemma3"]
    handle = install_kv_quantization(model, KVQuantizer(bits=16))
    try:
        with torch.no_grad():
            cache = model(input_ids).past_key_values
    finally:
        handle.remove()
    lens = [layer.keys.shape[-2] for layer in cache.layers]
    assert lens[1] == SEQ
    assert lens[0] < SEQ and lens[0] <= model.config.sliding_window


def test_quantize_cache_is_idempotent():
    from transformers import DynamicCache

    q = CountingKV(bits=4)
    cache = DynamicCache()
    assert quantize_cache(cache, q) is cache
    quantize_cache(cache, q)  # must not wrap twice
    k = torch.randn(1, 2, 3, 8)
    cache.update(k, k.clone(), 0)
    assert len(q.calls) == 1
    torch.testing.assert_close(cache.layers[0].keys, fake_quantize(k, q.fmt, None))


def test_kv_channel_granularity_and_groups():
    k = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    q = KVQuantizer(bits=4, key_granularity="channel", value_granularity="token", group_size=4)
    qk, qv = q(k, k)
    # channel: one scale per channel over the tokens (dim -2)
    expected_k = fake_quantize(k.transpose(-1, -2), q.fmt, None).transpose(-1, -2)
    assert torch.equal(qk, expected_k)
    # token with group_size 4: two groups per head_dim of 8
    assert torch.equal(qv, fake_quantize(k, q.fmt, 4))
    assert not torch.equal(qk, qv)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_with_kv_hook(models, input_ids, family):
    model = models[family]
    mask = torch.ones_like(input_ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids, **kwargs)
    assert ref.shape == (1, SEQ + 3)
    # 16-bit passthrough: same tokens as without the hook
    q16 = CountingKV(bits=16)
    handle = install_kv_quantization(model, q16)
    try:
        with torch.no_grad():
            out16 = model.generate(input_ids, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(out16, ref)
    # 4 bits: generation works; the cache generate passes is wrapped once (not once per step):
    # prefill (40 tokens) + 2 decode steps (1 token each), per layer
    q4 = CountingKV(bits=4)
    handle = install_kv_quantization(model, q4)
    try:
        with torch.no_grad():
            out4 = model.generate(input_ids, **kwargs)
    finally:
        handle.remove()
    assert out4.shape == (1, SEQ + 3)
    assert torch.equal(out4[:, :SEQ], input_ids)
    assert ((out4 >= 0) & (out4 < VOCAB_SIZE)).all()
    n_layers = model.config.num_hidden_layers
    seq_lens = [k[2] for k, _ in q4.calls]
    assert seq_lens == [SEQ] * n_layers + [1] * (2 * n_layers)
