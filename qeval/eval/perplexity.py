"""Perplexity with the protocol of the quantization papers (GPTQ, AWQ,
OmniQuant, Qllm-Eval): the corpus joined with blank lines and tokenized
once, cut into non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped), each window scored independently from an
empty context; perplexity = exp(mean NLL over all predicted tokens).

The standard error comes from the spread of the per-window mean NLLs (delta
method: se(ppl) = ppl * se(mean NLL)); with few windows it is rough, and it
is reported with the window count so a reader can judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qeval.data import tokenized_corpus
from qeval.eval.scorer import Scorer, as_scorer
from qeval.eval.scores import mean_variance


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float
    windows: int
    tokens: int

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "ppl": self.ppl,
            "ppl_stderr": self.ppl_stderr,
            "nll": self.nll,
            "windows": self.windows,
            "tokens": self.tokens,
        }


def corpus_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The non-overlapping ``seqlen``-token windows that are scored (the tail is dropped)."""
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n_windows)]


def perplexity(
    scorer: Scorer | torch.nn.Module,
    tokenizer: Any,
    dataset: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | None = None,
    decode_chunk: int | None = None,
) -> PerplexityResult:
    """Perplexity on ``dataset`` with the papers' protocol, from a scorer's window NLLs (any
    backend scores exactly these windows; see qeval.eval.scorer)."""
    ids = tokenized_corpus(tokenizer, dataset, data_dir)
    nlls = as_scorer(scorer, tokenizer).window_nlls(
        corpus_windows(ids, seqlen, max_windows), decode_chunk, f"{dataset} ppl"
    )
    mean, var, n = mean_variance(nlls)  # NaN windows propagate: a broken model scores NaN
    sd = math.sqrt(var) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(ppl=ppl, ppl_stderr=ppl * sd / math.sqrt(n), nll=mean, windows=n, tokens=n * (seqlen - 1))
