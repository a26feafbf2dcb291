"""Perplexity with the protocol of the quantization papers (GPTQ, AWQ,
OmniQuant, Qllm-Eval): the corpus joined with blank lines and tokenized
once, cut into non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped), each window scored independently from an
empty context; perplexity = exp(mean NLL over all predicted tokens).

The standard error comes from the spread of the per-window mean NLLs (delta
method: se(ppl) = ppl * se(mean NLL)); with few windows it is rough, and it
is reported with the window count so a reader can judge.

Given the unquantized model's reference (``reference_model``, cached under
``reference_cache_dir``; or ``is_reference`` for the FP cell itself), the same forward pass
also compares each window's full next-token distributions with the FP model's: KL divergence,
top-1 agreement, Δp and ln(PPL ratio), token-level (qeval.eval.divergence).  Perplexity is
computed from the same logits with the same operation, so its numbers do not change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from qeval.data import tokenized_corpus
from qeval.eval import divergence as dv
from qeval.eval.scorer import Scorer, as_scorer, iter_next_token_logits
from qeval.eval.scores import mean_variance

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float
    windows: int
    tokens: int
    #: divergence from the FP model (qeval.eval.divergence.aggregate); empty when not computed
    divergence: dict[str, float] = field(default_factory=dict)
    #: per window, columnar: "id" ("w0", "w1", ...), "nll", "tokens", and with divergence the
    #: window sums of qeval.eval.divergence.WINDOW_COLUMNS (not part of as_metrics)
    items: dict[str, list[Any]] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "ppl": self.ppl,
            "ppl_stderr": self.ppl_stderr,
            "nll": self.nll,
            "windows": self.windows,
            "tokens": self.tokens,
            **self.divergence,
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
    *,
    reference_model: torch.nn.Module | None = None,
    reference_cache_dir: str | Path | None = None,
    reference_key: str = "",
    is_reference: bool = False,
    top_k: int = dv.DEFAULT_TOP_K,
    tail_samples: int = dv.DEFAULT_TAIL_SAMPLES,
) -> PerplexityResult:
    """Perplexity on ``dataset`` with the papers' protocol, from a scorer's window NLLs (any
    backend scores exactly these windows; see qeval.eval.scorer).

    Divergence from the unquantized model (only where the scorer gives full-vocabulary logits):

    * ``is_reference``: this scorer *is* the FP model; its reference is built from its own logits
      in the same pass (written to the cache when ``reference_cache_dir`` is given) and it
      scores KLD 0, top-1 agreement 1;
    * otherwise the reference is read from ``reference_cache_dir`` (key: ``reference_key``, e.g.
      the FP weight fingerprint, plus dataset, windows, ``top_k`` and ``decode_chunk``), or
      computed with ``reference_model`` (an extra pass on that model's own device) and cached.

    Without any of them (or on a scorer without logits) the result is exactly the plain one.
    """
    ids = tokenized_corpus(tokenizer, dataset, data_dir)
    windows = corpus_windows(ids, seqlen, max_windows)
    scorer = as_scorer(scorer, tokenizer)
    desc = f"{dataset} ppl"
    wanted = is_reference or reference_model is not None or reference_cache_dir is not None
    logits = scorer.next_token_logits(windows, decode_chunk, desc) if wanted else None
    if wanted and logits is None:
        log.info("%s: %s gives no full-vocabulary logits; no divergence from the FP model", desc, type(scorer).__name__)
    refs: list[dv.WindowReference] | None = None
    cache: Path | None = None
    cache_key: dict[str, Any] = {}
    if logits is not None:
        key = reference_key or _fingerprint(scorer.hf_model if is_reference else reference_model)
        if reference_cache_dir is not None and key:
            cache_key = dv.reference_cache_key(key, dataset, seqlen, windows, top_k, decode_chunk, tail_samples)
            cache = dv.reference_cache_path(reference_cache_dir, cache_key)
        if not is_reference:
            refs = _reference(windows, cache, cache_key, reference_model, (top_k, tail_samples), decode_chunk, desc)
            if refs is None:
                log.info("%s: no cached FP reference and no reference model; no divergence metrics", desc)
                logits = None
    if logits is None:
        return _result(scorer.window_nlls(windows, decode_chunk, desc), seqlen)

    nlls: list[float] = []
    stats: list[dv.WindowStats] = []
    token_kld: list[torch.Tensor] = []
    built: list[dv.WindowReference] = []
    for i, (window, window_logits) in enumerate(zip(windows, logits)):
        targets = window[1:].to(window_logits.device)
        nlls.append(F.cross_entropy(window_logits, targets).item())  # exactly window_nlls' value
        if is_reference:  # the FP cell: its own logits are the reference
            built.append(dv.reference_from_logits(window_logits, targets, top_k, tail_samples, seed=i))
            ref = built[-1]
        else:
            assert refs is not None
            ref = refs[i]
        div = dv.compare_logits(ref, window_logits)
        del window_logits
        stats.append(dv.window_stats(div, nlls[-1]))
        token_kld.append(div.kld)
    if built and cache is not None and dv.load_reference(cache, cache_key) is None:
        dv.save_reference(cache, cache_key, built)
        log.info("%s: FP reference written to %s", desc, cache)
    result = _result(nlls, seqlen)
    result.divergence = dv.aggregate(stats, torch.cat(token_kld))
    for column in dv.WINDOW_COLUMNS:
        result.items[column] = [getattr(s, column) for s in stats]
    return result


def prepare_reference(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: str,
    seqlen: int,
    max_windows: int | None,
    data_dir: str | None,
    decode_chunk: int | None,
    cache_dir: str | Path,
    key: str,
    top_k: int = dv.DEFAULT_TOP_K,
    tail_samples: int = dv.DEFAULT_TAIL_SAMPLES,
) -> None:
    """Make sure the FP reference of these windows is in ``cache_dir`` (key: the FP weight
    fingerprint), computing it with ``model`` (the unquantized model) if it is not.  The runner
    calls this on a cell's own copy before quantizing it, so that :func:`perplexity` later reads
    the reference from the cache and no second, unquantized model has to be kept."""
    ids = tokenized_corpus(tokenizer, dataset, data_dir)
    windows = corpus_windows(ids, seqlen, max_windows)
    cache_key = dv.reference_cache_key(key, dataset, seqlen, windows, top_k, decode_chunk, tail_samples)
    cache = dv.reference_cache_path(cache_dir, cache_key)
    _reference(windows, cache, cache_key, model, (top_k, tail_samples), decode_chunk, f"{dataset} ppl")


def _result(nlls: list[float], seqlen: int) -> PerplexityResult:
    mean, var, n = mean_variance(nlls)  # NaN windows propagate: a broken model scores NaN
    sd = math.sqrt(var) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=ppl * sd / math.sqrt(n),
        nll=mean,
        windows=n,
        tokens=n * (seqlen - 1),
        items={"id": [f"w{i}" for i in range(n)], "nll": list(nlls), "tokens": [seqlen - 1] * n},
    )


def _fingerprint(model: torch.nn.Module | None) -> str:
    if model is None:
        return ""
    from qeval.models.loading import weights_fingerprint  # imports transformers' Auto classes

    return weights_fingerprint(model)


def _reference(
    windows: list[torch.Tensor],
    cache: Path | None,
    cache_key: dict[str, Any],
    model: torch.nn.Module | None,
    sizes: tuple[int, int],
    decode_chunk: int | None,
    desc: str,
) -> list[dv.WindowReference] | None:
    """The FP reference of every window: from the cache, else computed with ``model`` and cached."""
    if cache is not None:
        refs = dv.load_reference(cache, cache_key)
        if refs is not None and all(torch.equal(r.targets, w[1:].int()) for r, w in zip(refs, windows)):
            log.info("%s: FP reference from %s", desc, cache)
            return refs
        if refs is not None:
            log.warning("%s: cached FP reference %s is for other tokens: recomputing", desc, cache)
    if model is None:
        return None
    top_k, tail_samples = sizes
    log.info("%s: computing the FP reference (top %d, %d tail samples)", desc, top_k, tail_samples)
    refs = []
    fp_logits = iter_next_token_logits(model, windows, f"{desc} (FP reference)", decode_chunk)
    for i, (window, logits) in enumerate(zip(windows, fp_logits)):
        refs.append(dv.reference_from_logits(logits, window[1:], top_k, tail_samples, seed=i))
        del logits
    if cache is not None:
        dv.save_reference(cache, cache_key, refs)
        log.info("%s: FP reference written to %s", desc, cache)
    return refs
