"""What evaluation scores: the :class:`Scorer` protocol and its in-process HF implementation.

Every task kind reads a model through this protocol: perplexity asks for the mean
NLL of token windows (and, to compare with the unquantized model, for their full next-token
logits where the backend has them), lm-eval tasks for an lm-eval ``LM``, qeval-native tasks
for an in-memory HF model.  Backends (``qeval.backends``) produce scorers; evaluation never
asks which backend it has, nor how the model was quantized.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qeval.config import QuantSpec, quantized


@runtime_checkable
class Scorer(Protocol):
    """What every task kind needs from a model under evaluation."""

    #: an in-memory HF model for qeval-native tasks (which drive ``generate`` themselves);
    #: None where the backend cannot offer one (its ``task_kinds`` then lack "native")
    hf_model: nn.Module | None

    def window_nlls(self, windows: list[torch.Tensor], decode_chunk: int | None, desc: str) -> list[float]:
        """Mean next-token NLL of each token window, each scored from an empty context."""
        ...

    def next_token_logits(
        self, windows: list[torch.Tensor], decode_chunk: int | None, desc: str
    ) -> Iterator[torch.Tensor] | None:
        """Float32 logits [T-1, V] of each window (row t predicts token t+1), one window at a
        time and from the same forward pass ``window_nlls`` would make; None where the backend
        cannot give full-vocabulary logits (perplexity then reports no divergence metrics)."""
        ...

    def lm_eval_model(self, batch_size: int | str, chat_template_args: dict[str, Any] | None = None) -> Any:
        """An lm-eval ``LM`` that scores this model; ``chat_template_args`` reach the tokenizer's
        chat template (``enable_thinking``) when a task applies it."""
        ...


def window_logits(model, window: torch.Tensor, decode_chunk: int | None) -> torch.Tensor:
    if not decode_chunk:
        return model(window).logits
    # decode-style: feed the window through the KV cache a chunk at a time, so that
    # earlier tokens are seen the way a serving cache stores them (KIVI semantics)
    cache, logits = None, []
    for start in range(0, window.shape[1], decode_chunk):
        out = model(window[:, start : start + decode_chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@torch.no_grad()
def iter_next_token_logits(
    model: nn.Module, windows: list[torch.Tensor], desc: str = "perplexity", decode_chunk: int | None = None
) -> Iterator[torch.Tensor]:
    """Float32 next-token logits [T-1, V] of each token window under an in-memory HF model, on the
    model's device (one forward per window, or ``decode_chunk`` tokens per forward through the KV
    cache); windows are scored lazily, as the iterator is read."""
    device = next(model.parameters()).device
    for window in tqdm(windows, desc=desc, leave=False):
        window = window.unsqueeze(0).to(device)
        yield window_logits(model, window, decode_chunk)[0, :-1].float()


@torch.no_grad()
def window_nlls(
    model: nn.Module, windows: list[torch.Tensor], desc: str = "perplexity", decode_chunk: int | None = None
) -> list[float]:
    """Mean NLL of each token window under an in-memory HF model (one forward per window, or
    ``decode_chunk`` tokens per forward through the KV cache)."""
    nlls = []
    for window, logits in zip(windows, iter_next_token_logits(model, windows, desc, decode_chunk)):
        nlls.append(F.cross_entropy(logits, window[1:].to(logits.device)).item())
    return nlls


def shared_context_allowed(spec: QuantSpec) -> tuple[bool, str]:
    """Whether scoring a context once for all its continuations (``HFScorer(shared_context=True)``)
    gives the same numbers as scoring each (context, continuation) sequence whole under ``spec``;
    (allowed, the reason when not).

    It does when quantizing a token never looks at other tokens of the sequence: activations
    unquantized, per token, or with a static (calibrated) scale; KV states unquantized or per
    token, quantized as they enter the cache (``semantics: fake``).  A dynamic per-tensor
    activation scale, a per-channel or per-tensor KV scale (taken over the tokens of a forward)
    and KIVI's cache (full precision within the residual window, quantized once a token leaves
    it) all make the context's numbers depend on what follows it.
    """
    a, kv = spec.a, spec.kv
    if quantized(a) and a.dynamic and a.granularity != "token":
        return False, (
            f"activations are quantized per {a.granularity} with a dynamic scale: the scale spans the "
            "whole sequence, so the context's quantization depends on the continuation"
        )
    if quantized(kv):
        if kv.semantics != "fake":
            return False, (
                f"KV semantics {kv.semantics!r} (KIVI) quantizes stored tokens outside a residual window: "
                "which context tokens are quantized depends on the tokens after them"
            )
        for part, granularity in (("key", kv.key_granularity), ("value", kv.value_granularity)):
            if granularity != "token":
                return False, (
                    f"KV {part}s are quantized per {granularity}: the scale spans the tokens of a forward, "
                    "so the context's quantization depends on the continuation"
                )
    return True, ""


class HFScorer:
    """An in-memory transformers model (fake-quantized or not), scored in this process.

    ``shared_context``: lm-eval log-likelihood requests that share a context compute it once
    (:class:`qeval.eval.shared_context.SharedContextLM`); pass
    ``shared_context_allowed(spec)[0]``, since the numbers equal lm-eval's ``HFLM`` only for
    specs that quantize each token on its own (the hf backend does).  False (the default for a
    bare model, whose spec the scorer cannot know): lm-eval's ``HFLM`` itself.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, shared_context: bool = False) -> None:
        self.hf_model: nn.Module | None = model
        self.model, self.tokenizer = model, tokenizer
        self.shared_context = shared_context

    def window_nlls(self, windows: list[torch.Tensor], decode_chunk: int | None, desc: str) -> list[float]:
        return window_nlls(self.model, windows, desc=desc, decode_chunk=decode_chunk)

    def next_token_logits(
        self, windows: list[torch.Tensor], decode_chunk: int | None, desc: str
    ) -> Iterator[torch.Tensor] | None:
        return iter_next_token_logits(self.model, windows, desc=desc, decode_chunk=decode_chunk)

    def lm_eval_model(self, batch_size: int | str, chat_template_args: dict[str, Any] | None = None) -> Any:
        """lm-eval's ``HFLM`` (or the shared-context subclass) over the in-memory model, recording
        how each generation ended and bounding rolling batches by memory (:func:`_lm_class`)."""
        from lm_eval.models.huggingface import HFLM  # lm-eval's model classes import slowly

        device = str(next(self.model.parameters()).device)
        cls = HFLM
        if self.shared_context:
            from qeval.eval.shared_context import SharedContextLM

            cls = SharedContextLM
        return _lm_class(cls)(
            pretrained=self.model,
            tokenizer=self.tokenizer,
            batch_size=batch_size,
            device=device,
            chat_template_args=dict(chat_template_args or {}),
        )


@functools.lru_cache(maxsize=4)
def _lm_class(cls: type) -> type:
    """``cls`` (lm-eval's HFLM or a subclass) recording how each generation ended
    (:mod:`qeval.eval.recording`) and scoring rolling windows at a batch that fits in memory
    (:mod:`qeval.eval.rolling`)."""
    from qeval.eval.recording import RecordsGenerations
    from qeval.eval.rolling import BoundedRollingBatch

    return type(f"Qeval{cls.__name__}", (RecordsGenerations, BoundedRollingBatch, cls), {})


def as_scorer(model: Scorer | nn.Module, tokenizer: Any) -> Scorer:
    """A scorer for a bare HF model (tests, benchmarks); a scorer is returned as it is."""
    return HFScorer(model, tokenizer) if isinstance(model, nn.Module) else model
