"""Paired statistics: a quantized cell against the unquantized (FP) cell on the same items.

Both cells score the same items, so the question "did quantization change the score?" is a
paired one.  An unpaired z-test on the two means treats the item-to-item spread as noise twice
and misses that most items do not change at all: with per-item outcomes the noise in the
*difference* is what counts, and it is usually far smaller.  This module works from per-item
outcomes (columnar records: a dict of equal-length lists with an ``"id"`` column) and gives

* :func:`align`: the items both cells scored, values in the same order;
* :func:`flips`: the paired 2x2 table of a binary outcome (right->wrong, wrong->right;
  Dutta et al. 2024, "Accuracy is Not All You Need": equal accuracy can hide many flips);
* :func:`mcnemar_exact`, :func:`sign_test`, :func:`paired_difference`,
  :func:`paired_bootstrap`: tests and intervals of the paired difference;
* :func:`holm`, :func:`benjamini_hochberg`, :func:`adjust`: many cells are compared at once,
  so p-values are adjusted before anything is called significant;
* :func:`retained`, :func:`verdict`, :func:`needed_n`: retained quality with an interval, and a
  three-way verdict against a tolerance ``keep`` ("within", "loss" or "inconclusive").

A leaf module: numpy and the standard library only (no scipy, which qeval does not depend
on; the binomial tails are computed here), and no torch.

Conventions: differences are always ``q - fp`` (negative = the quantized cell scores lower).
Bad arguments (unequal lengths, a bad method name, a non-binary array where binary data is
required) raise ``ValueError``; data that makes a quantity undefined (no items, an FP mean of
zero) gives NaN, because a report computes these for many cells and one undefined cell must
not stop the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

__all__ = [
    "Flips",
    "Paired",
    "PairedDiff",
    "Retained",
    "Verdict",
    "adjust",
    "agresti_min",
    "align",
    "benjamini_hochberg",
    "flips",
    "holm",
    "mcnemar_exact",
    "needed_n",
    "paired_bootstrap",
    "paired_difference",
    "retained",
    "sign_test",
    "verdict",
]

# Up to this many trials the binomial tail is summed in exact integer arithmetic; above it,
# in floating point from the largest term down (relative error ~1e-12, far below anything
# a p-value is read for, and no cost growing with the bit length of C(n, k)).
_EXACT_MAX_N = 1000
# Bootstrap index draws are made in blocks of about this many elements, so memory stays flat
# for large item counts (iters x n indices at once would be 2000 x 14000 x 8 bytes for MMLU).
_BOOTSTRAP_BLOCK = 1_000_000


# --------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Paired:
    """The items both cells scored, and what was left out.

    ``ids`` follow the FP record's order; ``fp[i]`` and ``q[i]`` are item ``ids[i]``.
    Counts of what was dropped are kept because a silent drop can bias a comparison (a
    quantized run that crashed on the hard items would look better): ``dropped_fp`` FP items
    whose id the quantized record lacks, ``dropped_q`` quantized items whose id the FP record
    lacks, ``dropped_missing`` ids present on both sides whose value is None/NaN on either.
    So ``n + dropped_fp + dropped_missing`` is the FP record's length and
    ``n + dropped_q + dropped_missing`` the quantized record's.
    """

    ids: list[str]
    fp: FloatArray
    q: FloatArray
    dropped_fp: int
    dropped_q: int
    dropped_missing: int

    @property
    def n(self) -> int:
        """Number of paired items."""
        return len(self.ids)


def _column_values(record: Mapping[str, Sequence[object]], column: str, side: str) -> dict[str, float]:
    """id -> value (NaN for None/NaN) of one record, checking the record's shape."""
    for key in ("id", column):
        if key not in record:
            raise ValueError(f"{side} record has no {key!r} column (columns: {sorted(record)})")
    ids, values = record["id"], record[column]
    if len(ids) != len(values):
        raise ValueError(f"{side} record: 'id' has {len(ids)} entries but {column!r} has {len(values)}")
    out: dict[str, float] = {}
    for item, value in zip(ids, values):
        if not isinstance(item, str):
            raise ValueError(f"{side} record: ids must be strings, got {item!r}")
        if item in out:
            raise ValueError(f"{side} record: id {item!r} appears more than once")
        if value is None:
            out[item] = math.nan
        elif isinstance(value, str | bytes):
            raise ValueError(f"{side} record: {column!r} of {item!r} is not a number: {value!r}")
        else:
            out[item] = float(value)  # type: ignore[arg-type]  # numbers, bools, numpy scalars
    return out


def align(fp: Mapping[str, Sequence[object]], q: Mapping[str, Sequence[object]], column: str) -> Paired:
    """Pair two per-item records on their ids; see :class:`Paired` for what is dropped.

    Items present on one side only, and pairs where either value is None/NaN, are dropped:
    a paired statistic needs both outcomes of an item.  Duplicate ids raise ``ValueError``
    (which of the two outcomes would be the item's is not decidable here).
    """
    fp_values = _column_values(fp, column, "FP")
    q_values = _column_values(q, column, "quantized")
    ids: list[str] = []
    fp_out: list[float] = []
    q_out: list[float] = []
    missing = 0
    for item, a in fp_values.items():
        if item not in q_values:
            continue
        b = q_values[item]
        if math.isnan(a) or math.isnan(b):
            missing += 1
            continue
        ids.append(item)
        fp_out.append(a)
        q_out.append(b)
    shared = len(ids) + missing
    return Paired(
        ids=ids,
        fp=np.asarray(fp_out, dtype=np.float64),
        q=np.asarray(q_out, dtype=np.float64),
        dropped_fp=len(fp_values) - shared,
        dropped_q=len(q_values) - shared,
        dropped_missing=missing,
    )


def _pair_arrays(fp: npt.ArrayLike, q: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Two equal-length 1-D float arrays without NaN (paired values, e.g. from :func:`align`)."""
    a = np.asarray(fp, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired values must be two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("paired values contain NaN; pair the records with align(), which drops them")
    return a, b


def _is_binary(*arrays: FloatArray) -> bool:
    return all(bool(np.isin(x, (0.0, 1.0)).all()) for x in arrays)


# --------------------------------------------------------------------------- binary flips


@dataclass(frozen=True)
class Flips:
    """The paired 2x2 table of a binary outcome (1 = right), FP rows against quantized columns.

    ``right_to_wrong`` is McNemar's b (FP right, quantized wrong), ``wrong_to_right`` its c.
    ``share_changed`` = (b + c) / n is the flip rate of Dutta et al. (2024): two cells can have
    the same accuracy and still disagree on many items (NaN for n = 0).
    """

    n: int
    both_right: int
    both_wrong: int
    right_to_wrong: int
    wrong_to_right: int
    share_changed: float


def flips(fp_correct: npt.ArrayLike, q_correct: npt.ArrayLike) -> Flips:
    """Count the paired 2x2 table of two aligned binary outcomes (0/1 or booleans)."""
    a, b = _pair_arrays(fp_correct, q_correct)
    if not _is_binary(a, b):
        raise ValueError("flips() needs binary outcomes (0/1 or booleans)")
    fa, fb = a == 1.0, b == 1.0
    n = int(a.size)
    changed = int(np.count_nonzero(fa != fb))
    return Flips(
        n=n,
        both_right=int(np.count_nonzero(fa & fb)),
        both_wrong=int(np.count_nonzero(~fa & ~fb)),
        right_to_wrong=int(np.count_nonzero(fa & ~fb)),
        wrong_to_right=int(np.count_nonzero(~fa & fb)),
        share_changed=changed / n if n else math.nan,
    )


# --------------------------------------------------------------------------- exact tests


def _binom_half_pmf(k: int, n: int) -> float:
    """P(X = k) for X ~ Binomial(n, 1/2)."""
    if k < 0 or k > n:
        return 0.0
    if n <= _EXACT_MAX_N:
        return math.comb(n, k) / 2**n
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))


def _binom_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2).

    Small n: the exact integer sum, divided once (Python's int division rounds correctly).
    Large n: the lower tail is summed from its largest term P(X = k) downwards, each term
    the previous times i / (n - i + 1), stopping once terms no longer change the sum; a tail
    reaching past n/2 is taken as the complement of the other, smaller one (symmetry).
    """
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if 2 * k >= n:
        return 1.0 - _binom_half_cdf(n - k - 1, n)
    if n <= _EXACT_MAX_N:
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    total, term = 0.0, 1.0
    for i in range(k, -1, -1):
        total += term
        if term < 1e-17 * total:
            break
        term *= i / (n - i + 1)
    return _binom_half_pmf(k, n) * total


def _count(x: int, name: str) -> int:
    value = int(x)
    if value != x or value < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {x!r}")
    return value


def mcnemar_exact(b: int, c: int, mid_p: bool = False) -> float:
    """Two-sided exact McNemar p-value of b right->wrong against c wrong->right flips.

    Conditional on the b + c discordant items, b ~ Binomial(b + c, 1/2) when quantization
    changes nothing; p = min(1, 2 P(X <= min(b, c))), and 1.0 when nothing flipped.  Exact
    rather than the chi-square form because the flip counts of quick suites are small, where
    the chi-square approximation is poor.  ``mid_p`` counts the observed table only half
    (p = 2 P(X < k) + P(X = k)): less conservative, its level is close to nominal in practice
    (Fagerland et al. 2013) but not guaranteed.
    """
    b, c = _count(b, "b"), _count(c, "c")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    p = 2.0 * _binom_half_cdf(k, n)
    if mid_p:
        p -= _binom_half_pmf(k, n)
    return min(1.0, p)


def sign_test(fp: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Two-sided exact sign test of paired values: is an item as likely to get worse as better?

    Ties (exactly equal values) are dropped, the usual convention; the count of worse items
    among the rest is Binomial(m, 1/2) under no change.  For binary outcomes the worse and
    better items are McNemar's b and c, so this *is* the exact McNemar test.  It tests signs,
    not the mean: it needs no distribution of the differences and stays exact for a handful
    of items or windows, at the price of power against a t-test when differences are Gaussian.
    """
    a, b = _pair_arrays(fp, q)
    d = b - a
    return mcnemar_exact(int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0)))


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference ``q - fp`` with its plain standard error and a paired test.

    ``se`` = sd(q - fp, ddof=1) / sqrt(n): 0 when every difference is equal (for binary data:
    no item flipped), NaN when n < 2 (one item says nothing about spread).  A zero SE from a
    few unchanged items is not certainty, so intervals of binary outcomes use
    :func:`agresti_min`, not this SE (see :func:`retained`).  ``p_value``: exact McNemar for
    binary outcomes, exact sign test otherwise (the same binomial test, see :func:`sign_test`).
    ``worse``/``better``: items whose quantized value is lower/higher (b and c for binary data).
    """

    n: int
    mean: float
    se: float
    p_value: float
    test: Literal["mcnemar", "sign"]
    worse: int
    better: int


def paired_difference(fp: npt.ArrayLike, q: npt.ArrayLike, binary: bool | None = None) -> PairedDiff:
    """Mean difference ``q - fp`` of aligned values, its SE and a two-sided exact paired p-value.

    ``binary=None`` detects 0/1 outcomes on both sides; it only names the test (McNemar
    and the sign test give the same p-value on 0/1 data).
    """
    a, b = _pair_arrays(fp, q)
    is_binary = _is_binary(a, b) if binary is None else binary
    if is_binary and not _is_binary(a, b):
        raise ValueError("binary=True but the values are not all 0/1")
    d = b - a
    n = int(d.size)
    worse, better = int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0))
    return PairedDiff(
        n=n,
        mean=float(d.mean()) if n else math.nan,
        se=float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan,
        p_value=mcnemar_exact(worse, better),
        test="mcnemar" if is_binary else "sign",
        worse=worse,
        better=better,
    )


def mean_stderr_from_sums(total: float, sq_total: float, n: int) -> tuple[float, float]:
    """Mean and standard error (sample sd with ddof=1, over sqrt(n)) of n values known only by
    their sum and sum of squares: how per-token statistics are kept per window (the per-token
    values themselves are too many to store).  NaN mean for n = 0, NaN SE for n < 2."""
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    if n == 1:
        return mean, math.nan
    var = max(sq_total / n - mean * mean, 0.0) * n / (n - 1)
    return mean, math.sqrt(var / n)


def paired_bootstrap(
    fp: npt.ArrayLike, q: npt.ArrayLike, iters: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean difference ``q - fp``.

    Items are resampled as pairs (the pairing is what makes the difference precise), with
    ``numpy.random.default_rng(seed)``: the same seed, ``iters`` and item count give the same
    interval.  A check on the normal interval when differences are skewed or few; (NaN, NaN)
    for no items.  Like any percentile bootstrap it is too narrow for very few items.
    """
    a, b = _pair_arrays(fp, q)
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = b - a
    n = int(d.size)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(iters, dtype=np.float64)
    rows = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, iters, rows):
        stop = min(iters, start + rows)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


# --------------------------------------------------------------------------- multiple comparisons


def _pvalues(pvalues: Sequence[float]) -> tuple[list[float], list[int]]:
    """The p-values as floats and the positions of the non-NaN ones, ascending by p (stable)."""
    p = [float(x) for x in pvalues]
    for x in p:
        if not (math.isnan(x) or 0.0 <= x <= 1.0):
            raise ValueError(f"p-values must lie in [0, 1] (or be NaN), got {x}")
    order = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    return p, order


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence).

    Sorted ascending, p_(i) is multiplied by m - i + 1 and the running maximum is taken, so
    the adjusted values keep the raw order; capped at 1.  NaN entries stay NaN and are not
    counted in m (a cell without a p-value is not a comparison).  Same order as the input.
    """
    p, order = _pvalues(pvalues)
    m = len(order)
    out = list(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate control).

    Sorted ascending, p_(i) becomes min over j >= i of m p_(j) / j, capped at 1.  BH assumes
    independent or positively dependent tests; cells sharing one FP baseline are positively
    dependent in the usual way, and a sweep has many cells, where Holm loses most power.
    NaN entries stay NaN and are not counted in m.  Same order as the input.
    """
    p, order = _pvalues(pvalues)
    m = len(order)
    out = list(p)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, m * p[i] / (rank + 1))
        out[i] = running
    return out


ADJUSTMENTS = ("bh", "holm", "none")


def adjust(pvalues: Sequence[float], method: str) -> list[float]:
    """Adjust p-values by ``method``: "bh" (Benjamini–Hochberg), "holm" or "none" (unchanged)."""
    if method == "bh":
        return benjamini_hochberg(pvalues)
    if method == "holm":
        return holm(pvalues)
    if method == "none":
        return _pvalues(pvalues)[0]
    raise ValueError(f"unknown p-value adjustment {method!r}; choose one of {', '.join(ADJUSTMENTS)}")


# --------------------------------------------------------------------------- retained quality


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def agresti_min(table: Flips) -> tuple[float, float]:
    """Agresti–Min (2005) estimate and SE of the paired difference of proportions, q - fp.

    Adds 1/2 to each of the four cells (n + 2 items) before the Wald formula:
    d = (c - b) / (n + 2), se = sqrt((b + c + 1) - (c - b)^2 / (n + 2)) / (n + 2).
    Why: the plain paired SE is 0 when no item flipped, so 4 unchanged items would claim
    certainty; with the added halves zero flips in n items give se = 1 / (n + 2), an interval
    of width ~4/n, and the Wald interval's coverage becomes close to nominal.
    """
    n, b, c = table.n, table.right_to_wrong, table.wrong_to_right
    m = n + 2
    return (c - b) / m, math.sqrt((b + c + 1) - (c - b) ** 2 / m) / m


@dataclass(frozen=True)
class Retained:
    """Retained quality of a quantized cell, with an interval and a paired test.

    ``value`` is the estimate (mean(q) / mean(fp), or ppl_fp / ppl_q on the log scale),
    ``low``/``high`` the interval at ``z``.  The interval is symmetric on a working scale:
    retained itself (``log_scale=False``) or log retained (``log_scale=True``); ``center``
    and ``se`` are on that scale (``center`` differs from ``value`` only for binary data,
    where the Agresti–Min estimate shrinks the difference slightly towards 0).  ``p_diff``
    is the two-sided paired test of no difference (McNemar exact or sign test).
    """

    value: float
    low: float
    high: float
    n: int
    se: float
    p_diff: float
    center: float
    log_scale: bool
    z: float

    def _working(self, keep: float) -> float:
        if not keep > 0.0:
            raise ValueError(f"keep must be positive, got {keep}")
        return math.log(keep) if self.log_scale else keep

    def p_below(self, keep: float) -> float:
        """One-sided p-value of H0 "retained >= keep" (normal approximation, the same SE).

        Small values say retained is significantly below ``keep``.  Computed from the same
        center and SE as the interval, so p_below(keep) < Phi(-z) exactly when ``high`` < keep
        (for binary data: the upper bound before it is clipped to the possible range).
        With a zero SE the answer is 0 or 1; NaN when undefined.
        """
        k = self._working(keep)
        if math.isnan(self.center) or math.isnan(self.se):
            return math.nan
        if self.se == 0.0:
            return 0.0 if self.center < k else 1.0
        return _normal_cdf((self.center - k) / self.se)


def retained_from_log_mean(
    n: int,
    mean_log_diff: float,
    se: float,
    higher_is_better: bool = False,
    z: float = 1.96,
    p_diff: float | None = None,
) -> Retained:
    """Retained quality from the mean paired difference of logs, q - fp, and its SE.

    For lower-is-better logs (an NLL) r = exp(-mean), e.g. PPL_FP / PPL_q from the mean
    per-token NLL difference; the interval exponentiates mean +/- z se.  ``p_diff`` is the
    paired test of no difference; None: the two-sided z-test of the same mean and SE (for n
    large, e.g. thousands of tokens).
    """
    center = mean_log_diff if higher_is_better else -mean_log_diff
    if p_diff is None:
        if math.isnan(center) or math.isnan(se):
            p_diff = math.nan
        elif se == 0.0:
            p_diff = 1.0 if center == 0.0 else 0.0
        else:
            p_diff = math.erfc(abs(center / se) / math.sqrt(2.0))
    return Retained(
        value=math.exp(center),
        low=math.exp(center - z * se),
        high=math.exp(center + z * se),
        n=n,
        se=se,
        p_diff=p_diff,
        center=center,
        log_scale=True,
        z=z,
    )


def _undefined(n: int, p_diff: float, log_scale: bool, z: float) -> Retained:
    nan = math.nan
    return Retained(nan, nan, nan, n, nan, p_diff, nan, log_scale, z)


def retained(
    fp: npt.ArrayLike,
    q: npt.ArrayLike,
    higher_is_better: bool,
    log_scale: bool = False,
    z: float = 1.96,
    binary: bool | None = None,
) -> Retained:
    """Retained quality of aligned per-item values, with a z-interval (z=1.96: 95 %).

    * Higher-is-better scores (``log_scale=False``): r = mean(q) / mean(fp), which needs
      mean(fp) > 0 (NaN otherwise).  The interval is r +/- z se_d / mean(fp), se_d the SE of
      the mean paired difference: mean(fp) is treated as fixed.  That is the delta method of
      the ratio evaluated at r = 1; it ignores the FP mean's own noise, which enters only in
      proportion to 1 - r, small wherever a verdict is close.  Binary outcomes (``binary``,
      or detected 0/1 values) use the Agresti–Min difference and SE (:func:`agresti_min`),
      so no flips in few items is not certainty; their interval is clipped to the possible
      range [0, 1 / mean(fp)], like Agresti–Min's own truncation.
    * Log-scale values (``log_scale=True``): per-window or per-item logs, e.g. the mean NLL of
      each perplexity window (lower is better).  r = exp(-mean(q - fp)) = ppl_fp / ppl_q
      (exp(+mean(q - fp)) for higher-is-better logs), and the interval exponentiates the
      interval of the mean log difference, so it stays positive and asymmetric.  This is
      ppl_fp / ppl_q exactly when the windows have equal token counts (perplexity.py's
      non-overlapping windows of ``seqlen`` tokens).
    * Lower-is-better values on their own scale are refused (ValueError): compare them
      through their logs.
    """
    if not z > 0.0:
        raise ValueError(f"z must be positive, got {z}")
    if not higher_is_better and not log_scale:
        raise ValueError("a lower-is-better metric is compared on the log scale (log_scale=True), e.g. per-window NLL")
    if log_scale and binary:
        raise ValueError("binary outcomes are not log values; use log_scale=False")
    a, b = _pair_arrays(fp, q)
    is_binary = (not log_scale) and (_is_binary(a, b) if binary is None else binary)
    diff = paired_difference(a, b, binary=is_binary)
    n = diff.n
    if n == 0:
        return _undefined(n, diff.p_value, log_scale, z)
    if log_scale:
        return retained_from_log_mean(n, diff.mean, diff.se, higher_is_better, z, p_diff=diff.p_value)
    s_fp = float(a.mean())
    if not s_fp > 0.0:
        return _undefined(n, diff.p_value, log_scale, z)
    value = float(b.mean()) / s_fp
    if is_binary:
        d_center, se_d = agresti_min(flips(a, b))
        center, se = 1.0 + d_center / s_fp, se_d / s_fp
        low, high = max(0.0, center - z * se), min(1.0 / s_fp, center + z * se)
    else:
        center, se = value, diff.se / s_fp
        low, high = center - z * se, center + z * se
    return Retained(value, low, high, n, se, diff.p_value, center, False, z)


@dataclass(frozen=True)
class Verdict:
    """A retained-quality verdict against the tolerance ``keep``.

    ``n_needed`` (inconclusive verdicts only) is a rough planning number from :func:`needed_n`.
    """

    verdict: Literal["within", "loss", "inconclusive"]
    keep: float
    n_needed: int | None


def needed_n(ret: Retained, keep: float, z: float | None = None) -> int | None:
    """Rough number of items for the interval to exclude ``keep``: n (z se / |r - keep|)^2.

    Assumes the per-item variance observed so far (n se^2) stays as it is, with r and keep
    on the interval's working scale (logs for ``log_scale``).  A planning number, not a
    guarantee: the estimate moves as items are added, and for binary outcomes with few flips
    the Agresti–Min SE reflects the added halves more than the data, so the number is
    conservative there.  Where the interval already excludes keep but adjusted p-values are
    still missing, it can be below n.  None where undefined (r == keep, no SE, no items).
    """
    k = ret._working(keep)
    zz = ret.z if z is None else z
    gap = abs(ret.center - k)
    if ret.n == 0 or math.isnan(gap) or math.isnan(ret.se) or gap == 0.0:
        return None
    return math.ceil(ret.n * (zz * ret.se / gap) ** 2)


def verdict(
    ret: Retained, keep: float, p_below_adjusted: float, p_diff_adjusted: float, alpha: float = 0.05
) -> Verdict:
    """Three-way verdict of a retained quality against ``keep`` (e.g. 0.98 = keep 98 %).

    * "within": the interval's lower bound is at least ``keep`` (the interval is ``ret``'s,
      at its z, not widened for multiplicity; pass a larger z to :func:`retained` for that).
      Checked first.
    * "loss": the estimate is below ``keep`` AND both adjusted p-values are below ``alpha``:
      significantly below the tolerance (``p_below_adjusted``, from :meth:`Retained.p_below`)
      and a significant paired difference at all (``p_diff_adjusted``, from ``ret.p_diff``).
      Both are required so that neither a small-sample normal approximation alone nor a
      tiny but significant difference alone calls a loss.
    * "inconclusive" otherwise, with :func:`needed_n` as a rough number of items to decide.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ret._working(keep)  # validates keep
    if ret.low >= keep:
        return Verdict("within", keep, None)
    if ret.value < keep and p_below_adjusted < alpha and p_diff_adjusted < alpha:
        return Verdict("loss", keep, None)
    return Verdict("inconclusive", keep, needed_n(ret, keep))
