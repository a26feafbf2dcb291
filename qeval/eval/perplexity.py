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

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from qeval.data import tokenized_corpus
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


def _window_logits(model, window: torch.Tensor, decode_chunk: int | None) -> torch.Tensor:
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


def corpus_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The non-overlapping ``seqlen``-token windows that are scored (the tail is dropped)."""
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n_windows)]


@torch.no_grad()
def window_nlls(
    model,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    desc: str = "perplexity",
    decode_chunk: int | None = None,
) -> list[float]:
    """Mean NLL of each non-overlapping window of ``seqlen`` tokens."""
    device = next(model.parameters()).device
    nlls = []
    for window in tqdm(corpus_windows(ids, seqlen, max_windows), desc=desc, leave=False):
        window = window.unsqueeze(0).to(device)
        logits = _window_logits(model, window, decode_chunk)[0, :-1].float()
        nlls.append(F.cross_entropy(logits, window[0, 1:]).item())
    return nlls


def perplexity(
    model,
    tokenizer,
    dataset: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | None = None,
    decode_chunk: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (an HF model, or an engine with ``window_nlls``
    such as the vLLM backend's) on ``dataset`` with the papers' protocol."""
    ids = tokenized_corpus(tokenizer, dataset, data_dir)
    if hasattr(model, "window_nlls"):  # a real-kernel engine scores the same windows itself
        nlls = model.window_nlls([w.tolist() for w in corpus_windows(ids, seqlen, max_windows)])
    else:
        nlls = window_nlls(model, ids, seqlen, max_windows, desc=f"{dataset} ppl", decode_chunk=decode_chunk)
    mean, var, n = mean_variance(nlls)  # NaN windows propagate: a broken model scores NaN
    sd = math.sqrt(var) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(ppl=ppl, ppl_stderr=ppl * sd / math.sqrt(n), nll=mean, windows=n, tokens=n * (seqlen - 1))
