"""Tiny random models, one per supported family, for tests.

Built from configs with a fixed seed (same weights every time, no download)
and paired with a byte-level tokenizer (256 byte tokens + specials) that
needs no training data, so an end-to-end run through lm-eval works offline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported lazily: config validation lists families without it
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 256 + len(SPECIALS)

_COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
_DECODER = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _config(model_type: str, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **_COMMON, **kwargs)


TINY_FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": lambda: _config("llama", **_DECODER, tie_word_embeddings=True),
    "mistral": lambda: _config("mistral", **_DECODER, sliding_window=64),
    "qwen2": lambda: _config("qwen2", **_DECODER, tie_word_embeddings=True),
    "gemma3": lambda: _config(
        "gemma3_text",
        **_DECODER,
        sliding_window=32,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen3": lambda: _config("qwen3", **_DECODER),  # q/k norms
    "granite": lambda: _config("granite", **_DECODER),
    "gemma2": lambda: _config("gemma2", **_DECODER, sliding_window=32, query_pre_attn_scalar=16),
    "opt": lambda: _config(
        "opt",
        hidden_size=64,
        ffn_dim=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        do_layer_norm_before=True,
    ),
}


# The families below are kept apart from TINY_FAMILIES (plain attention + MLP blocks, the
# parametrized tests of each method run over those): fused projections, post-norms, parallel
# blocks, experts and state-space mixers.  All of them are in the adapter table
# (qeval/models/adapters.py); tests/test_family_invariants.py checks every method's invariants
# on every family the table has, and what a family cannot do is refused with its reason.
TINY_DENSE_FAMILIES: dict[str, Callable[[], Any]] = {
    "phi3": lambda: _config("phi3", **_DECODER),  # fused qkv_proj and gate_up_proj
    "olmo2": lambda: _config("olmo2", **_DECODER),  # post-norms: GPTQ, not the scale-folding methods
    "gpt_neox": lambda: _config(  # fused query_key_value, parallel attention and MLP
        "gpt_neox", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4
    ),
    "falcon": lambda: _config(
        "falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
    ),
}
# Mixture-of-Experts families (transformers 5: fused expert tensors, a router per block).
# Sizes keep the expert tensors' two inner dimensions distinct, so their layout is
# unambiguous from the shape.
_MOE = dict(_DECODER, num_experts_per_tok=2)
TINY_MOE_FAMILIES: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: _config("mixtral", **_MOE, num_local_experts=4),
    "qwen3_moe": lambda: _config(
        "qwen3_moe", **_MOE, num_experts=4, moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[]
    ),
    "granitemoe": lambda: _config(
        "granitemoe", **dict(_DECODER, intermediate_size=48), num_local_experts=4, num_experts_per_tok=2
    ),
    # experts as x @ W[e] ([experts, in, out]); the router subclasses nn.Linear
    "llama4_text": lambda: _config(
        "llama4_text",
        **dict(_MOE, num_experts_per_tok=1),
        num_local_experts=4,
        intermediate_size_mlp=96,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
    ),
    # experts as x @ W[e] + b[e], attention sinks, sliding and full layers
    "gpt_oss": lambda: _config(
        "gpt_oss",
        **_MOE,
        num_local_experts=4,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # multi-head latent attention (q_a/q_b, kv_a/kv_b), a dense first layer, a shared expert
    "deepseek_v3": lambda: _config(
        "deepseek_v3",
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
}
# state-space families: Mamba has no attention, so no KV cache (KV specs are refused on it);
# Falcon-H1 runs attention and a Mamba mixer side by side in every layer
TINY_SSM_FAMILIES: dict[str, Callable[[], Any]] = {
    "mamba": lambda: _config(
        "mamba", hidden_size=64, state_size=8, num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=True
    ),
    "falcon_h1": lambda: _config(
        "falcon_h1",
        **_DECODER,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=16,
    ),
}
ALL_TINY_FAMILIES: dict[str, Callable[[], Any]] = {
    **TINY_FAMILIES,
    **TINY_DENSE_FAMILIES,
    **TINY_MOE_FAMILIES,
    **TINY_SSM_FAMILIES,
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet, key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised model of ``family`` with fixed weights for ``seed``."""
    from transformers import AutoModelForCausalLM

    if family not in ALL_TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}: allowed {', '.join(sorted(ALL_TINY_FAMILIES))}")
    config = ALL_TINY_FAMILIES[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # default inits are tiny (std 0.02): widen them so quantization error is visible
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()
