"""lm-eval's rolling log-likelihood (document perplexity, e.g. ``qeval_wikitext``) at a batch
size that fits in memory.

``HFLM.loglikelihood_rolling`` cuts each document into windows of the model's whole context
(``max_length``: 8,192 tokens for SmolLM2) and scores ``batch_size`` of them per forward.  The
logits of one batch are batch × max_length × vocabulary floats and lm-eval's log-softmax makes
a second copy: at batch 16 on SmolLM2 that asks for 25.8 GB at once, more than a 24 GiB
machine has, while the same batch of 16 is harmless for multiple-choice requests of a few
hundred tokens in the same suite.  The mixin lowers the batch for rolling requests only, to
what fits a budget (a quarter of the RAM available when the task starts), and logs that it
did.  The scores do not depend on it: each window is scored on its own, and right padding
after a window does not change a causal model's logits for that window.
"""

from __future__ import annotations

import logging
from typing import Any

from qeval.memory import GIB, available_bytes

log = logging.getLogger(__name__)

# float32 logits of a window, lm-eval's log-softmax of them, and the temporaries beside them
LOGITS_COPIES = 3
BUDGET_SHARE = 0.25  # of the RAM available when a rolling task starts


def rolling_batch_size(requested: int, max_length: int, vocab: int, budget_bytes: int) -> int:
    """The largest batch of ``max_length``-token windows, at most ``requested``, whose logits
    (``LOGITS_COPIES`` float32 copies over ``vocab``) fit ``budget_bytes``; never below 1."""
    per_window = LOGITS_COPIES * max_length * vocab * 4
    return max(1, min(requested, budget_bytes // max(per_window, 1)))


def _vocab_size(model: Any) -> int:
    """The width of the logits: the output head's (it may pad the tokenizer's vocabulary), else
    the text config's vocabulary (transformers' ``get_text_config`` covers multimodal configs)."""
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.get_text_config().vocab_size)


class BoundedRollingBatch:
    """Mixin over lm-eval's ``HFLM``: see the module docstring."""

    batch_size_per_gpu: int | str  # HFLM's: a number, or "auto"

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        requested = self.batch_size_per_gpu
        if not isinstance(requested, int):  # "auto" (a GPU): lm-eval's own search finds what fits
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]
        max_length = int(self.max_length)  # type: ignore[attr-defined]
        budget = int(available_bytes() * BUDGET_SHARE)
        bounded = rolling_batch_size(requested, max_length, _vocab_size(self.model), budget)  # type: ignore[attr-defined]
        if bounded < requested:
            log.info(
                "rolling log-likelihood: batch %d -> %d (windows of %d tokens; logits kept within %.1f GiB)",
                requested,
                bounded,
                max_length,
                budget / GIB,
            )
        self.batch_size_per_gpu = bounded
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]
        finally:
            self.batch_size_per_gpu = requested
