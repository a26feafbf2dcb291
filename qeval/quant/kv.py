"""KV-cache quantization through transformers' Cache API.

Every attention implementation in transformers hands its new key/value states
to ``past_key_values.update(...)`` and attends over what that call returns.
qeval therefore quantizes *inside the cache*: a forward pre-hook on the model
makes sure a cache is always passed, and that cache's ``update`` quantizes the
incoming states before storing them.  No attention class is copied per
architecture, so every family transformers supports (including Gemma 3's
mixed sliding/global layers) works unchanged.

Semantics ``fake`` (Qllm-Eval's): keys and values are quantized before
attention in every pass, prefill included, so a single-pass perplexity sees
the error.

Semantics ``cache`` (KIVI's): what a deployed quantized cache does.  The
tokens of the current forward attend to each other in full precision; once
stored, tokens older than the ``residual`` most recent ones are quantized in
chunks of ``group_size`` tokens (keys per channel over the chunk, values per
token), so only later forwards (decode steps) see them quantized.  A
single-pass perplexity therefore sees no error at all under this semantics;
qeval evaluates it decode-style instead (``decode_chunk`` tokens per forward,
see :mod:`qeval.eval.perplexity`).

Key shape is ``[batch, kv_heads, seq, head_dim]``.  Granularity ``token``: one
scale per token and head (over ``head_dim``, or groups of it); ``channel``:
one scale per channel over the tokens of the current update.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from qeval.config import FULL_PRECISION_BITS
from qeval.placement import current_placement, streamed
from qeval.quant.formats import QuantFormat, fake_quantize, fake_quantize_per_tensor
from qeval.quant.typing_helpers import config_of


class KVQuantizer:
    """Fake-quantizes key and value states according to a KV spec."""

    def __init__(
        self,
        bits: int,
        kind: str = "int",
        sym: bool = False,
        group_size: int = -1,
        key_granularity: str = "token",
        value_granularity: str = "token",
    ) -> None:
        self.passthrough = bits == FULL_PRECISION_BITS
        self.fmt = QuantFormat(bits=bits if not self.passthrough else 8, kind=kind, sym=sym)
        self.group_size = None if group_size == -1 else group_size
        self.key_granularity = key_granularity
        self.value_granularity = value_granularity

    @classmethod
    def from_spec(cls, kv: Any) -> KVQuantizer:
        return cls(
            bits=kv.bits,
            kind=kv.format,
            sym=kv.sym,
            group_size=kv.group_size,
            key_granularity=kv.key_granularity,
            value_granularity=kv.value_granularity,
        )

    def _quantize(self, x: torch.Tensor, granularity: str) -> torch.Tensor:
        if self.passthrough:
            return x
        if granularity == "channel":
            return fake_quantize(x.transpose(-1, -2), self.fmt, None).transpose(-1, -2)
        if granularity == "tensor":  # one scale per layer and call (vLLM's FP8 cache is per tensor)
            return fake_quantize_per_tensor(x, self.fmt)
        return fake_quantize(x, self.fmt, self.group_size)

    def __call__(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantize(keys, self.key_granularity), self._quantize(values, self.value_granularity)


class KIVIQuantizer:
    """KIVI's cache-only quantization: keys per channel, values per token, in
    chunks of ``group_size`` tokens that have left the ``residual`` window."""

    def __init__(
        self,
        bits: int,
        kind: str = "int",
        sym: bool = False,
        group_size: int = 32,
        residual: int = 32,
        value_group: int | None = None,
    ) -> None:
        self.fmt = QuantFormat(bits=bits, kind=kind, sym=sym)
        self.group_size, self.residual, self.value_group = group_size, residual, value_group

    @classmethod
    def from_spec(cls, kv: Any) -> KIVIQuantizer:
        group = 32 if kv.group_size == -1 else kv.group_size
        return cls(bits=kv.bits, kind=kv.format, sym=kv.sym, group_size=group, residual=kv.residual)

    def after_update(self, cache: Cache, layer_idx: int, new_tokens: int) -> None:
        """Quantize, in place, the stored tokens that just left the FP window."""
        layer = cache.layers[layer_idx]
        # called after the layer's update: a key/value layer holding the states it stored
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise TypeError(f"cache layer {layer_idx} ({type(layer).__name__}) holds no key/value states to quantize")
        keys, values = layer.keys, layer.values
        total = keys.shape[-2]
        tails = cache.__dict__.setdefault("_qeval_fp_tail", {})  # layer -> trailing FP tokens
        tail = min(tails.get(layer_idx, 0) + new_tokens, total)
        n = max(0, tail - self.residual) // self.group_size * self.group_size
        if n:
            start = total - tail
            k = keys[..., start : start + n, :]
            kg = k.reshape(*k.shape[:-2], n // self.group_size, self.group_size, k.shape[-1])
            kq = fake_quantize(kg.transpose(-1, -2), self.fmt, None).transpose(-1, -2)  # per channel
            keys[..., start : start + n, :] = kq.reshape_as(k)
            values[..., start : start + n, :] = fake_quantize(
                values[..., start : start + n, :], self.fmt, self.value_group
            )  # per token
            tail -= n
        tails[layer_idx] = tail


def quantize_cache(cache: Cache, quantizer: KVQuantizer | KIVIQuantizer) -> Cache:
    """Make ``cache`` quantize the key/value states it receives (idempotent)."""
    if getattr(cache, "_qeval_kv", None) is quantizer:
        return cache
    original_update = cache.update

    if isinstance(quantizer, KIVIQuantizer):

        def update(
            self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # attention sees the stored (partly quantized) past and the new tokens in full
            # precision; the stored copy is quantized afterwards
            keys, values = original_update(key_states, value_states, layer_idx, *args, **kwargs)
            keys, values = keys.clone(), values.clone()
            quantizer.after_update(self, layer_idx, key_states.shape[-2])
            return keys, values
    else:

        def update(
            self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            key_states, value_states = quantizer(key_states, value_states)
            return original_update(key_states, value_states, layer_idx, *args, **kwargs)  # noqa: B023 - called within this iteration

    cache.update = types.MethodType(update, cache)  # type: ignore[method-assign]
    cache._qeval_kv = quantizer  # type: ignore[attr-defined]
    return cache


@torch.no_grad()
def observe_cached_states(
    model: nn.Module, batches: Any, observe: Callable[[int, torch.Tensor, torch.Tensor], None]
) -> None:
    """Run ``batches`` through ``model`` and call ``observe(layer_idx, keys, values)`` with the
    states every layer hands to its cache: after rotary embedding and any q/k norm, i.e.
    what a serving cache stores (and what any installed KV quantizer has produced)."""
    for batch in batches:
        cache = DynamicCache(config=config_of(model))
        original_update = cache.update

        def update(
            self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            observe(layer_idx, key_states, value_states)
            return original_update(key_states, value_states, layer_idx, *args, **kwargs)  # noqa: B023 - called within this iteration

        cache.update = types.MethodType(update, cache)  # type: ignore[method-assign]
        model(batch, past_key_values=cache, use_cache=True)


def kv_quantizer_from_spec(kv: Any) -> KVQuantizer | KIVIQuantizer:
    return KIVIQuantizer.from_spec(kv) if kv.semantics == "cache" else KVQuantizer.from_spec(kv)


def install_kv_quantization(
    model: nn.Module, quantizer: KVQuantizer | KIVIQuantizer
) -> torch.utils.hooks.RemovableHandle:
    """Route every forward of ``model`` through a quantizing cache.

    A call without a cache (a log-likelihood forward from lm-eval, a
    perplexity window) gets a fresh ``DynamicCache`` built from the model's
    config (so sliding-window layers stay sliding); a call with a cache
    (``generate``) gets that cache wrapped in place.
    """
    config = config_of(model)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache(config=config)
        kwargs["past_key_values"] = quantize_cache(cache, quantizer)
        kwargs["use_cache"] = True
        return args, kwargs

    return model.register_forward_pre_hook(pre_hook, with_kwargs=True)


KV_LAYERS_ATTR = "_qeval_kv_layers"  # (layers that store keys and values, cache layers), set below


@torch.no_grad()
def kv_cache_layers(model: nn.Module) -> tuple[int, int]:
    """(layers whose keys and values go through the cache, layers of the cache) of ``model``,
    read by running two tokens through a fresh cache: what a KV spec would quantize.

    A state-space layer (Mamba) keeps a recurrent state, not keys and values, and never calls
    the cache's ``update``; a hybrid model stores keys and values in its attention layers only.
    """
    config = config_of(model)
    cache = DynamicCache(config=config)
    placement = current_placement(model)
    with streamed(model, placement):
        model(torch.ones(1, 2, dtype=torch.long, device=placement.compute), past_key_values=cache, use_cache=True)
    layers = list(getattr(cache, "layers", []))
    stored = sum(1 for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0)
    return stored, len(layers)


def kv_layers_or_refuse(model: nn.Module) -> tuple[int, int]:
    """:func:`kv_cache_layers`, refusing (UnsupportedCellError, naming the architecture) a model
    none of whose layers keeps keys and values, rather than record a KV cell whose numbers are
    the unquantized model's."""
    from qeval.errors import UnsupportedCellError

    stored, total = kv_cache_layers(model)
    if stored == 0:
        model_type = getattr(config_of(model), "model_type", "?")
        raise UnsupportedCellError(
            f"KV quantization on {model_type!r}: none of its {total} layers stores keys and values in the "
            "cache (state-space layers keep a recurrent state instead), so there is nothing to quantize"
        )
    return stored, total


def install_kv_for_spec(model: nn.Module, kv: Any, layers: tuple[int, int] | None = None) -> tuple[int, int]:
    """Install the KV quantization ``kv`` asks for (refusing a model without KV layers, see
    :func:`kv_layers_or_refuse`; ``layers`` when already probed).  Returns and keeps on the
    model (for the cell's record) (layers quantized, cache layers)."""
    layers = kv_layers_or_refuse(model) if layers is None else layers
    install_kv_quantization(model, kv_quantizer_from_spec(kv))
    setattr(model, KV_LAYERS_ATTR, layers)
    return layers


def cache_contents(model: nn.Module) -> str | None:
    """What a KV spec quantizes when the cache does not hold per-head keys and values.

    Multi-head latent attention (DeepSeek-V2/V3) caches, per token, the compressed latent
    (``kv_lora_rank`` wide, after its norm) in the key slot and the shared rotary key
    (``qk_rope_head_dim``) in the value slot, and expands them into per-head keys and values
    only when attending: that latent cache is what a deployment stores, so it is what qeval
    quantizes (``quant.kv.key_*`` settings apply to the latent, ``value_*`` to the rotary key).
    """
    config = config_of(model)
    rank = getattr(config, "kv_lora_rank", None)
    if not rank:
        return None
    rope = getattr(config, "qk_rope_head_dim", "?")
    return (
        f"multi-head latent attention: the cache holds each token's compressed latent ({rank} wide) and shared "
        f"rotary key ({rope} wide), quantized as stored; quant.kv.key_* settings apply to the latent, value_* to "
        "the rotary key"
    )
