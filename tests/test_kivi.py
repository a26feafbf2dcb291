"""KIVI-style cache-only KV quantization: prefill untouched, stored tokens quantized."""

from __future__ import annotations

import pytest
import torch

from qeval.eval.scorer import window_logits
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.kv import KIVIQuantizer, install_kv_quantization

X = torch.randint(3, 259, (1, 96), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_prefill_is_full_precision_and_decode_sees_the_quantized_cache(family):
    ref, model = build_tiny_model(family), build_tiny_model(family)
    install_kv_quantization(model, KIVIQuantizer(bits=2, group_size=8, residual=16))
    with torch.no_grad():
        fp = ref(X).logits
        one_pass = model(X).logits
        decoded = window_logits(model, X, decode_chunk=4)
        ref_decoded = window_logits(ref, X, decode_chunk=4)
    torch.testing.assert_close(one_pass, fp)  # a single pass never reads stored tokens
    torch.testing.assert_close(ref_decoded, fp, atol=1e-4, rtol=1e-4)  # chunking alone changes nothing
    # the first residual + group tokens are never quantized before they are read
    torch.testing.assert_close(decoded[:, :24], fp[:, :24], atol=1e-4, rtol=1e-4)
    assert (decoded[:, 40:] - fp[:, 40:]).abs().max() > 1e-3


def test_stored_keys_are_quantized_per_channel_in_token_groups():
    model = build_tiny_model("llama")
    q = KIVIQuantizer(bits=2, group_size=8, residual=16)
    install_kv_quantization(model, q)
    with torch.no_grad():
        out = model(X[:, :50], use_cache=True)
    layer = out.past_key_values.layers[0]
    keys, values = layer.keys, layer.values  # [1, kv_heads, 50, head_dim]
    # 50 tokens, residual 16: the oldest 32 (four groups of 8) are quantized, 18 stay FP
    for g in range(4):
        block = keys[0, 0, g * 8 : (g + 1) * 8, :]
        for ch in range(block.shape[-1]):
            assert block[:, ch].unique().numel() <= 4  # 2 bits per channel within the group
        for t in range(8):
            assert values[0, 0, g * 8 + t].unique().numel() <= 4  # values: 2 bits per token
    tail = keys[0, 0, 32:, :]
    assert tail.unique().numel() > 4 * tail.shape[-1]
    assert out.past_key_values._qeval_fp_tail[0] == 18
