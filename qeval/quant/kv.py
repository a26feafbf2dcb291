"""KV-cache quantization through transformers' Cache API.

Every attention implementation in transformers hands its new key/value states
to ``past_key_values.update(...)`` and attends over what that call returns.
qeval therefore quantizes *inside the cache*: a forward pre-hook on the model
makes sure a cache is always passed, and that cache's ``update`` quantizes the
incoming states before storing them.  No attention class is copied per
architecture, so every family transformers supports (including Gemma 3's
mixed sliding/global layers) works unchanged.

Semantics ``fake`` (Qllm-Eval's): keys and values are quantized before
attention in every pass, prefill included, so perplexity sees the error.  The
cache-only semantics of KIVI (prefill in full precision, a full-precision
residual window) come with the methods issue.

Key shape is ``[batch, kv_heads, seq, head_dim]``.  Granularity ``token``: one
scale per token and head (over ``head_dim``, or groups of it); ``channel``:
one scale per channel over the tokens of the current update.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from qeval.config import FULL_PRECISION_BITS
from qeval.quant.formats import QuantFormat, fake_quantize


class KVQuantizer:
    """Fake-quantizes key and value states according to a KV spec."""

    def __init__(self, bits: int, kind: str = "int", sym: bool = False, group_size: int = -1,
                 key_granularity: str = "token", value_granularity: str = "token") -> None:
        self.passthrough = bits == FULL_PRECISION_BITS
        self.fmt = QuantFormat(bits=bits if not self.passthrough else 8, kind=kind, sym=sym)
        self.group_size = None if group_size == -1 else group_size
        self.key_granularity = key_granularity
        self.value_granularity = value_granularity

    @classmethod
    def from_spec(cls, kv: Any) -> "KVQuantizer":
        return cls(bits=kv.bits, kind=kv.format, sym=kv.sym, group_size=kv.group_size,
                   key_granularity=kv.key_granularity, value_granularity=kv.value_granularity)

    def _quantize(self, x: torch.Tensor, granularity: str) -> torch.Tensor:
        if self.passthrough:
            return x
        if granularity == "channel":
            return fake_quantize(x.transpose(-1, -2), self.fmt, None).transpose(-1, -2)
        return fake_quantize(x, self.fmt, self.group_size)

    def __call__(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantize(keys, self.key_granularity), self._quantize(values, self.value_granularity)


def quantize_cache(cache: Cache, quantizer: KVQuantizer) -> Cache:
    """Make ``cache`` quantize every key/value state it receives (idempotent)."""
    if getattr(cache, "_qeval_kv", None) is quantizer:
        return cache
    original_update = cache.update

    def update(self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = quantizer(key_states, value_states)
        return original_update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = types.MethodType(update, cache)  # type: ignore[method-assign]
    cache._qeval_kv = quantizer  # type: ignore[attr-defined]
    return cache


def install_kv_quantization(model: nn.Module, quantizer: KVQuantizer) -> torch.utils.hooks.RemovableHandle:
    """Route every forward of ``model`` through a quantizing cache.

    A call without a cache (a log-likelihood forward from lm-eval, a
    perplexity window) gets a fresh ``DynamicCache`` built from the model's
    config (so sliding-window layers stay sliding); a call with a cache
    (``generate``) gets that cache wrapped in place.
    """
    config = model.config

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache(config=config)
        kwargs["past_key_values"] = quantize_cache(cache, quantizer)
        kwargs["use_cache"] = True
        return args, kwargs

    return model.register_forward_pre_hook(pre_hook, with_kwargs=True)
