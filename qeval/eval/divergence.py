"""Distribution-level damage: how far a quantized model's next-token distributions moved from the
unquantized (FP) model's, on the perplexity windows (what llama.cpp's ``llama-perplexity
--kl-divergence`` reports).

Perplexity only reads the probability of the token that came next; two models with the same
perplexity can disagree everywhere else.  The FP model's distributions are computed once per model
and windows and cached on disk (:class:`WindowReference`, :func:`save_reference`); each quantized
cell's perplexity pass then compares its own logits, window by window, in the same forward pass
(qeval.eval.perplexity).

Per predicted token (P = FP model, Q = quantized model, y = the actual next token):

* ``kld``: KL(P || Q), estimated from the stored reference (below);
* ``top1_agree``: Q gives P's most likely token its own largest probability (a tie counts as
  agreement, so a model compared with itself agrees everywhere);
* ``dp`` = p_P(y) - p_Q(y) (positive: Q is less sure of the right token; llama.cpp prints the
  opposite sign, p_Q - p_P, as "Δp");
* ``dnll`` = NLL_Q(y) - NLL_P(y), whose mean is ln(PPL_Q / PPL_P).

The stored reference and the KLD estimate
-----------------------------------------
Storing P's full distribution costs V floats per token (49,152 for SmolLM2: 400 MB per
2048-token window; llama.cpp stores all of it, 16 bits a logit).  The reference keeps, per token:
P's top-k log-probabilities (float16) and ids (int32); the log of the mass outside them,
log p_rest (float32); m tokens drawn from that rest with their log-probabilities (float16, int32
ids); and log p_P(y) (float32).

*Top k and one rest bucket* (a lower bound).  Over k + 1 outcomes, the top-k tokens and a "rest"
bucket::

    B_k = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

with q_rest = Q's mass outside the same k ids (the sum of Q's probabilities there, i.e.
1 - sum_i q_i without its cancellation; log-probabilities clamped at -69 for numerical safety).
By the log-sum inequality, sum_{j in rest} p_j log(p_j / q_j) >= p_rest log(p_rest / q_rest),
so B_k is a lower bound of the full KLD, exact at k = V and growing with k.  It is not close
enough: quantization moves the whole distribution, and the rest bucket hides everything that
moves inside the rest.  Measured (SmolLM2-135M, 2 x 2048 WikiText-2 tokens): B_32 is 14-27 %
below the full KLD for w8, w4g128, w3g128, kv4, kv3, kv2 (-23 % for w4g128, -19 % for kv4),
B_64 11-20 % below, and even B_1024 3.6 % below for w4g128.

*The rest, sampled* (the estimate reported).  The part the bucket misses is exactly
p_rest * KL(P~ || Q~), with P~, Q~ the two distributions renormalized over the rest.  With
w = q~_j / p~_j, KL(P~ || Q~) = E_{j ~ P~}[-log w] = E_{j ~ P~}[w - 1 - log w] (since
E_{P~}[w] = 1; the term w - 1 is a control variate that removes the first-order noise, and every
term is >= 0).  The m draws j_1..j_m are taken from P~ once, when the reference is built, by
systematic sampling (one draw in each 1/m of P~'s cumulative mass in id order, from a random
offset per position, seeded by the window index: reproducible; each token is drawn m p~_j
times in expectation, so tokens holding 1/m of the rest are always drawn).  Then::

    KLD = B_k + p_rest * (1/m) sum_s (w_s - 1 - log w_s),   w_s = (q_{j_s} / q_rest) / (p_{j_s} / p_rest)

is an unbiased estimate of the full-vocabulary KLD per token, >= B_k, exact at k = V (no rest).
It is noisy per token where Q puts much more mass than P on rare tokens (w >> 1); means over
thousands of tokens are not.  The comparison is made at the reference's storage precision: Q's
log-probabilities at the stored ids are rounded to float16 like P's, so a model compared with
its own reference scores exactly 0.

k = 32 (``DEFAULT_TOP_K``) and m = 32 (``DEFAULT_TAIL_SAMPLES``), by measurement
(``benchmarks/kld_truncation.py``, docs/BENCHMARKS.md; float16 storage): the mean KLD is within
0.32 % of the full-vocabulary KLD for all six specs and three sampling seeds (w4g128: -0.07,
-0.23, +0.19 %; kv4: -0.09, +0.10, +0.11 %); the percentiles p50..p99 within 4.3 % (p99.9,
about 4 tokens of 4094, within 12 %).  k = 8 or 16 with m = 16 already stays within 1.4 % in the
mean, with noisier percentiles; k = 64, m = 32 is within 0.32 % too, at 1.5 times the size.
The reference costs 6 bytes per token and stored entry plus 12 per token: 396 bytes per token at
k = m = 32, about 0.8 MB per 2048-token window.

Aggregation
-----------
Each window is reduced to sums (:class:`WindowStats`: token count, sums and sums of squares of
KLD, Δp and the NLL difference, the top-1 agreement count, the largest KLD, the window's NLL
under Q; variances from sums of squares, in float64), from which :func:`aggregate` computes token-level means and standard errors.  As in
llama.cpp, tokens are treated as independent: ``kld_stderr`` = sd(KLD) / sqrt(N) over all N
predicted tokens, ``top1_agree_stderr`` = sqrt(p (1 - p) / (N - 1)) (the binomial error, which is
also qeval's sample standard error over 0/1 items), ``ln_ppl_ratio_stderr`` the paired standard
error of the per-token NLL differences.  Tokens of one window are correlated, so these errors are
optimistic; the per-window sums (``PerplexityResult.items``) allow a window-level estimate
instead.  Percentiles need the per-token values and are reported only when they were kept in the
same pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from qeval.files import atomic_file
from qeval.stats.paired import mean_stderr_from_sums

log = logging.getLogger(__name__)

#: top-k entries kept per token by default (see the module docstring for the measurement)
DEFAULT_TOP_K = 32
#: tokens drawn from the rest of the distribution per token, by default
DEFAULT_TAIL_SAMPLES = 32
#: bumped whenever the cached arrays change meaning
CACHE_FORMAT = 1
#: floor of Q's log-probabilities and log rest mass: exp(-69) ~ 1e-30 (numerical safety)
LOG_FLOOR = -69.0
#: rows of a window's [T-1, V] logits processed at a time (bounds the temporaries)
ROW_CHUNK = 512

NAN = float("nan")


@dataclass(frozen=True)
class WindowReference:
    """The FP model's next-token distributions on one window: top k, a sample of the rest.

    Row t describes the prediction of token t+1 of the window; every tensor is on the CPU.
    """

    top_logp: torch.Tensor  # float16 [N, k], descending: log p of the k most likely tokens
    top_ids: torch.Tensor  # int32 [N, k]: their ids (column 0 is the FP model's top-1)
    tail_logp: torch.Tensor  # float16 [N, m]: log p of m tokens drawn from the rest (outside the top k)
    tail_ids: torch.Tensor  # int32 [N, m]: their ids
    rest_logp: torch.Tensor  # float32 [N]: log of the mass outside the top k (-inf when k = V)
    target_logp: torch.Tensor  # float32 [N]: log p of the actual next token
    targets: torch.Tensor  # int32 [N]: the actual next tokens (checked against the window)

    @property
    def tokens(self) -> int:
        return int(self.target_logp.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in self.arrays().values())

    def arrays(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in REFERENCE_ARRAYS}


#: the arrays of a reference, with the dtype each has in the cache
REFERENCE_ARRAYS = {
    "top_logp": torch.float16,
    "top_ids": torch.int32,
    "tail_logp": torch.float16,
    "tail_ids": torch.int32,
    "rest_logp": torch.float32,
    "target_logp": torch.float32,
    "targets": torch.int32,
}


@dataclass(frozen=True)
class TokenDivergence:
    """Per-token comparison of one window (float64 on the CPU, top-1 agreement as bool)."""

    kld: torch.Tensor  # the estimate: top k + rest bucket + the sampled within-rest term
    kld_bound: torch.Tensor  # top k + rest bucket only: a lower bound of the full KLD
    top1_agree: torch.Tensor
    dp: torch.Tensor
    dnll: torch.Tensor


@dataclass(frozen=True)
class WindowStats:
    """One window reduced to sums, enough for token-level means and standard errors."""

    tokens: int
    nll: float  # the window's mean NLL under Q (what perplexity averages)
    kld_sum: float
    kld_sq_sum: float
    kld_max: float
    top1_agree_count: int  # tokens whose top-1 agrees
    dp_sum: float
    dp_sq_sum: float
    dnll_sum: float
    dnll_sq_sum: float


#: the per-window columns of PerplexityResult.items besides id, nll and tokens
WINDOW_COLUMNS = (
    "kld_sum",
    "kld_sq_sum",
    "kld_max",
    "top1_agree_count",
    "dp_sum",
    "dp_sq_sum",
    "dnll_sum",
    "dnll_sq_sum",
)


def _rest_mass(logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities with 0 at ``ids``, log of their sum) per row: the mass outside ``ids``,
    summed directly (no 1 - sum cancellation)."""
    prob = logp.exp().scatter_(1, ids, 0.0)
    return prob, torch.log(prob.sum(dim=-1))


def systematic_sample(rest_prob: torch.Tensor, m: int, u: torch.Tensor) -> torch.Tensor:
    """Ids of ``m`` tokens per row drawn from ``rest_prob`` (unnormalized; overwritten) by
    systematic sampling: one draw in each 1/m of the cumulative mass, in id order, from the row's
    offset ``u`` in [0, 1).  Each token is drawn m * p / p_rest times in expectation, so a mean
    over the draws estimates an expectation under the normalized rest."""
    cum = rest_prob.cumsum_(dim=-1)
    # levels in (0, 1] of the total: the first token whose cumulative mass reaches one has positive mass
    levels = (torch.arange(m, device=cum.device, dtype=cum.dtype)[None, :] + 1 - u[:, None]) / m
    ids = torch.searchsorted(cum, levels * cum[:, -1:], right=False)
    return ids.clamp_(max=cum.shape[-1] - 1)


@torch.no_grad()
def reference_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int = DEFAULT_TOP_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> WindowReference:
    """The reference of one window from the FP model's next-token logits [N, V] (row t predicts
    ``targets[t]``): its top ``k`` and ``tail_samples`` draws from the rest (offsets from
    ``seed``, so a reference is reproducible).  ``dtype``: how the log-probabilities are stored
    (float16 in the cache; float32 to measure the storage error)."""
    k = min(k, logits.shape[-1])
    targets = targets.to(logits.device).long()
    offsets = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in REFERENCE_ARRAYS if name != "targets"}
    for start in range(0, logits.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        logp = F.log_softmax(logits[rows].float(), dim=-1)
        top, ids = logp.topk(k, dim=-1, sorted=True)
        parts["target_logp"].append(logp.gather(1, targets[rows, None])[:, 0].cpu())
        parts["top_logp"].append(top.to(dtype).cpu())
        parts["top_ids"].append(ids.int().cpu())
        rest_prob, rest = _rest_mass(logp, ids)
        parts["rest_logp"].append(rest.cpu())
        tail_ids = systematic_sample(rest_prob, tail_samples, offsets[rows].to(logp.device).float())
        parts["tail_logp"].append(logp.gather(1, tail_ids).to(dtype).cpu())
        parts["tail_ids"].append(tail_ids.int().cpu())
    return WindowReference(targets=targets.int().cpu(), **{name: torch.cat(ts) for name, ts in parts.items()})


def estimate_kld(
    r: Mapping[str, torch.Tensor], q_top_logp: torch.Tensor, q_tail_logp: torch.Tensor, q_rest_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) per row (float64): (estimate, lower bound), from P's reference rows ``r``
    (``WindowReference.arrays()``, possibly sliced) and Q's log-probs at the same ids
    (``q_top_logp`` [N, k], ``q_tail_logp`` [N, m]) and of the mass outside the top k
    (``q_rest_logp`` [N]).

    Q's log-probs at the reference ids are rounded to the reference's dtype first (its
    precision); a zero-probability outcome of P contributes nothing; Q's log-probs are floored
    at LOG_FLOOR.
    """
    lp = r["top_logp"].double()
    lq = q_top_logp.to(r["top_logp"].dtype).double().clamp(min=LOG_FLOOR)
    p = lp.exp()
    top = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    lr_p = r["rest_logp"].double()
    lr_q = q_rest_logp.double().clamp(min=LOG_FLOOR)
    p_rest = lr_p.exp()
    has_rest = p_rest > 0
    bucket = torch.where(has_rest, p_rest * (lr_p - lr_q), torch.zeros_like(p_rest))
    # within the rest: E_{j ~ P~}[w - 1 - log w], w = q~_j / p~_j (the normalized rest distributions)
    lt_q = q_tail_logp.to(r["tail_logp"].dtype).double().clamp(min=LOG_FLOOR)
    log_w = ((lt_q - lr_q[:, None]) - (r["tail_logp"].double() - lr_p[:, None])).clamp(max=-LOG_FLOOR)
    within = (torch.expm1(log_w) - log_w).mean(-1)
    inner = torch.where(has_rest & within.isfinite(), p_rest * within, torch.zeros_like(p_rest))
    bound = top + bucket
    return bound + inner, bound


@torch.no_grad()
def compare_logits(reference: WindowReference, logits: torch.Tensor) -> TokenDivergence:
    """Per-token divergence of a model's next-token logits [N, V] from a window's reference."""
    if logits.shape[0] != reference.tokens:
        raise ValueError(f"{logits.shape[0]} positions of logits for a reference of {reference.tokens}")
    device = logits.device
    out: dict[str, list[torch.Tensor]] = {"kld": [], "bound": [], "agree": [], "dp": [], "dnll": []}
    for start in range(0, logits.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        ids = reference.top_ids[rows].to(device).long()
        targets = reference.targets[rows].to(device).long()
        logq = F.log_softmax(logits[rows].float(), dim=-1)
        q_top = logq.gather(1, ids)
        q_tail = logq.gather(1, reference.tail_ids[rows].to(device).long())
        q_target = logq.gather(1, targets[:, None])[:, 0].cpu().double()
        agree = (q_top[:, 0] >= logq.amax(dim=-1)).cpu()
        _, q_rest = _rest_mass(logq, ids)
        ref_rows = {name: t[rows] for name, t in reference.arrays().items()}
        kld, bound = estimate_kld(ref_rows, q_top.cpu(), q_tail.cpu(), q_rest.cpu())
        out["kld"].append(kld)
        out["bound"].append(bound)
        out["agree"].append(agree)
        p_target = reference.target_logp[rows].double()
        out["dp"].append(p_target.exp() - q_target.exp())
        out["dnll"].append(p_target - q_target)
    return TokenDivergence(
        kld=torch.cat(out["kld"]),
        kld_bound=torch.cat(out["bound"]),
        top1_agree=torch.cat(out["agree"]),
        dp=torch.cat(out["dp"]),
        dnll=torch.cat(out["dnll"]),
    )


def window_stats(div: TokenDivergence, nll: float) -> WindowStats:
    """The sums one window contributes to :func:`aggregate`."""
    n = int(div.kld.numel())
    return WindowStats(
        tokens=n,
        nll=float(nll),
        kld_sum=float(div.kld.sum()),
        kld_sq_sum=float(div.kld.square().sum()),
        kld_max=float(div.kld.max()) if n else NAN,
        top1_agree_count=int(div.top1_agree.sum()),
        dp_sum=float(div.dp.sum()),
        dp_sq_sum=float(div.dp.square().sum()),
        dnll_sum=float(div.dnll.sum()),
        dnll_sq_sum=float(div.dnll.square().sum()),
    )


def binomial_stderr(successes: int, n: int) -> float:
    """sqrt(p (1 - p) / (n - 1)) with p = successes / n: the sample standard error of n 0/1 values."""
    if n <= 1:
        return NAN
    p = successes / n
    return math.sqrt(p * (1 - p) / (n - 1))


def aggregate(windows: Sequence[WindowStats], token_kld: Any = None) -> dict[str, float]:
    """Token-level divergence metrics over ``windows`` (flat keys, ``_stderr`` beside a mean).

    ``token_kld``: every token's KLD (e.g. the concatenation of the windows' ``kld`` tensors), for
    the percentiles ``kld_p50``..``kld_p999``; without it the percentiles are absent.
    """
    n = sum(w.tokens for w in windows)
    kld, kld_se = mean_stderr_from_sums(sum(w.kld_sum for w in windows), sum(w.kld_sq_sum for w in windows), n)
    dp, dp_se = mean_stderr_from_sums(sum(w.dp_sum for w in windows), sum(w.dp_sq_sum for w in windows), n)
    dnll, dnll_se = mean_stderr_from_sums(sum(w.dnll_sum for w in windows), sum(w.dnll_sq_sum for w in windows), n)
    agree = sum(w.top1_agree_count for w in windows)
    metrics: dict[str, float] = {
        "kld": kld,
        "kld_stderr": kld_se,
        "kld_max": max((w.kld_max for w in windows), default=NAN),
        "top1_agree": agree / n if n else NAN,
        "top1_agree_stderr": binomial_stderr(agree, n),
        "dp_mean": dp,
        "dp_mean_stderr": dp_se,
        "dp_rms": math.sqrt(sum(w.dp_sq_sum for w in windows) / n) if n else NAN,
        "ln_ppl_ratio": dnll,
        "ln_ppl_ratio_stderr": dnll_se,
    }
    if token_kld is not None:
        values = np.asarray(token_kld.cpu() if isinstance(token_kld, torch.Tensor) else token_kld, dtype=np.float64)
        if values.size != n:
            raise ValueError(f"{values.size} per-token KLD values for {n} tokens")
        if n:
            for name, q in (("kld_p50", 50), ("kld_p90", 90), ("kld_p99", 99), ("kld_p999", 99.9)):
                metrics[name] = float(np.percentile(values, q))
    return metrics


# --- the on-disk cache -------------------------------------------------------------------------


def windows_digest(windows: Sequence[torch.Tensor]) -> str:
    """sha256 of the windows' token ids (the corpus, tokenizer and window cut in one value)."""
    h = hashlib.sha256()
    for w in windows:
        h.update(w.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_cache_key(
    reference_key: str,
    dataset: str,
    seqlen: int,
    windows: Sequence[torch.Tensor],
    k: int,
    decode_chunk: int | None,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
) -> dict[str, Any]:
    """What a cached reference depends on: the FP model (``reference_key``, e.g. its weight
    fingerprint), the corpus and its windows, k, the tail samples and how the windows were fed."""
    return {
        "format": CACHE_FORMAT,
        "model": reference_key,
        "dataset": dataset,
        "seqlen": seqlen,
        "windows": len(windows),
        "tokens": windows_digest(windows),
        "k": k,
        "tail_samples": tail_samples,
        "decode_chunk": decode_chunk or 0,
    }


def reference_cache_path(cache_dir: str | Path, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"ppl-kld-{digest}.npz"


def save_reference(path: Path, key: Mapping[str, Any], refs: Sequence[WindowReference]) -> None:
    """Write every window's reference into one ``.npz`` (temp file in the folder, then rename)."""
    payload: dict[str, Any] = {name: np.stack([getattr(r, name).numpy() for r in refs]) for name in REFERENCE_ARRAYS}
    payload["key"] = np.array(json.dumps(dict(key), sort_keys=True))
    with atomic_file(path, ".npz") as f:
        np.savez(f, **payload)


def load_reference(path: Path, key: Mapping[str, Any]) -> list[WindowReference] | None:
    """The cached references, or None when the file is missing, unreadable, for another key or
    not shaped as a reference (a corrupt or foreign file is then recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != json.loads(json.dumps(dict(key), sort_keys=True)):
                log.warning("reference cache %s holds another key: recomputing", path)
                return None
            arrays = {name: data[name] for name in REFERENCE_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        log.warning("reference cache %s is unreadable (%s): recomputing", path, err)
        return None
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    n_windows, n_tokens = tensors["targets"].shape[:2] if tensors["targets"].dim() == 2 else (-1, -1)
    if (
        n_windows != key.get("windows")
        or any(t.dtype != REFERENCE_ARRAYS[name] for name, t in tensors.items())
        or any(t.shape[:2] != (n_windows, n_tokens) for t in tensors.values())
        or any(tensors[name].dim() != 3 for name in ("top_logp", "top_ids", "tail_logp", "tail_ids"))
        or tensors["top_logp"].shape != tensors["top_ids"].shape
        or tensors["tail_logp"].shape != tensors["tail_ids"].shape
    ):
        log.warning("reference cache %s has unexpected arrays: recomputing", path)
        return None
    return [WindowReference(**{name: t[i].clone() for name, t in tensors.items()}) for i in range(n_windows)]
