"""Paired statistics (qeval.stats.paired): every expected number is worked out here by hand
or in exact integer arithmetic, never by calling the function under test."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest

from qeval.stats import paired as P

# 20 items: 8 right on both, 6 wrong on both, 5 right->wrong (b), 1 wrong->right (c)
PATTERN = [(1, 1)] * 8 + [(0, 0)] * 6 + [(1, 0)] * 5 + [(0, 1)] * 1
FP_CORRECT = [a for a, _ in PATTERN]
Q_CORRECT = [b for _, b in PATTERN]
IDS = [f"item{i:02d}" for i in range(20)]


def records() -> tuple[dict[str, list], dict[str, list]]:
    """FP has one extra item the quantized run lacks; the quantized record is in reverse order."""
    fp = {"id": [*IDS, "fp_only"], "acc": [*FP_CORRECT, 1]}
    q = {"id": IDS[::-1], "acc": Q_CORRECT[::-1]}
    return fp, q


def exact_cdf(k: int, n: int) -> Fraction:
    """P(X <= k), X ~ Binomial(n, 1/2), as an exact fraction (C(n, i+1) = C(n, i) (n-i) / (i+1))."""
    total, term = 0, 1
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return Fraction(total, 2**n)


def test_align_pairs_ids_and_counts_drops():
    fp, q = records()
    pair = P.align(fp, q, "acc")
    assert pair.ids == IDS  # FP order, the reversed quantized side re-ordered
    assert pair.n == 20 and pair.dropped_fp == 1 and pair.dropped_q == 0 and pair.dropped_missing == 0
    np.testing.assert_array_equal(pair.fp, FP_CORRECT)
    np.testing.assert_array_equal(pair.q, Q_CORRECT)

    # None / NaN are dropped pairwise; ids on one side only are counted per side
    fp2 = {"id": ["a", "b", "c", "d"], "x": [1.0, None, 3.0, 4.0]}
    q2 = {"id": ["d", "c", "b", "e"], "x": [4.5, float("nan"), 2.0, 9.0]}
    pair2 = P.align(fp2, q2, "x")
    assert pair2.ids == ["d"] and pair2.fp.tolist() == [4.0] and pair2.q.tolist() == [4.5]
    assert (pair2.dropped_fp, pair2.dropped_q, pair2.dropped_missing) == (1, 1, 2)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"id": ["a", "a"], "x": [1, 2]}, "more than once"),
        ({"id": ["a", "b"], "x": [1]}, "entries"),
        ({"id": ["a"]}, "'x'"),
        ({"id": [1], "x": [1]}, "strings"),
        ({"id": ["a"], "x": ["0.5"]}, "not a number"),
    ],
)
def test_align_rejects_malformed_records(record, match):
    with pytest.raises(ValueError, match=match):
        P.align(record, {"id": ["a"], "x": [1]}, "x")


def test_flips_counts():
    fp, q = records()
    pair = P.align(fp, q, "acc")
    f = P.flips(pair.fp, pair.q)
    assert (f.n, f.both_right, f.both_wrong, f.right_to_wrong, f.wrong_to_right) == (20, 8, 6, 5, 1)
    assert f.share_changed == pytest.approx(6 / 20)
    with pytest.raises(ValueError, match="binary"):
        P.flips([0.5, 1.0], [1.0, 1.0])


def test_mcnemar_exact_hand_values():
    # b=5, c=1: 2 * (C(6,0) + C(6,1)) / 2^6
    assert P.mcnemar_exact(5, 1) == pytest.approx(2 * (1 + 6) / 64, rel=1e-15)
    assert P.mcnemar_exact(1, 5) == P.mcnemar_exact(5, 1)
    assert P.mcnemar_exact(0, 0) == 1.0
    assert P.mcnemar_exact(10, 0) == pytest.approx(2 / 1024, rel=1e-15)
    assert P.mcnemar_exact(3, 3) == 1.0  # capped
    # mid-p: 2 P(X < 1) + P(X = 1) = (2 * 1 + 6) / 64
    assert P.mcnemar_exact(5, 1, mid_p=True) == pytest.approx(8 / 64, rel=1e-15)
    with pytest.raises(ValueError):
        P.mcnemar_exact(-1, 2)


@pytest.mark.parametrize("k, n", [(1400, 3001), (0, 1001), (40, 1500), (1499, 3000), (1000, 1000), (12, 40)])
def test_binomial_tail_matches_exact_integers(k, n):
    """The floating-point tail for n above the exact threshold (and the symmetric branch)."""
    want = float(min(Fraction(1), 2 * exact_cdf(min(k, n - k), n)))
    assert P.mcnemar_exact(k, n - k) == pytest.approx(want, rel=1e-10)


def test_paired_difference_se_and_test():
    pair = P.align(*records(), "acc")
    d = P.paired_difference(pair.fp, pair.q)
    # differences: five -1, one +1, fourteen 0; mean -4/20
    mean = -4 / 20
    var = (5 * (-1 - mean) ** 2 + 1 * (1 - mean) ** 2 + 14 * (0 - mean) ** 2) / (20 - 1)
    assert d.n == 20 and d.mean == pytest.approx(mean)
    assert d.se == pytest.approx(math.sqrt(var / 20), rel=1e-12)
    assert d.se == pytest.approx(math.sqrt(5.2 / 19 / 20), rel=1e-12)
    assert d.test == "mcnemar" and d.p_value == pytest.approx(0.21875)
    assert (d.worse, d.better) == (5, 1)

    # no change: SE 0 (the plain formula), and undefined for one item
    assert P.paired_difference([1, 0, 1], [1, 0, 1]).se == 0.0
    assert math.isnan(P.paired_difference([1.0], [0.0]).se)


def test_sign_test_on_continuous_values():
    fp = [1.0, 2.0, 3.0, 4.0, 5.0]
    q = [1.5, 1.8, 3.0, 4.3, 5.1]  # diffs +0.5 -0.2 0 +0.3 +0.1: the tie is dropped
    d = P.paired_difference(fp, q)
    assert d.test == "sign" and (d.worse, d.better) == (1, 3)
    assert d.p_value == pytest.approx(2 * (1 + 4) / 16)
    assert P.sign_test(fp, q) == d.p_value
    with pytest.raises(ValueError, match="NaN"):
        P.paired_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        P.paired_difference([1.0, 2.0], [1.0])


def test_paired_bootstrap_is_seeded_and_close_to_normal_interval():
    rng = np.random.default_rng(123)
    fp = rng.normal(0.0, 1.0, 1000)
    q = fp + rng.normal(-0.05, 0.2, 1000)
    d = q - fp
    lo, hi = P.paired_bootstrap(fp, q, iters=2000, seed=7)
    assert (lo, hi) == P.paired_bootstrap(fp, q, iters=2000, seed=7)
    assert P.paired_bootstrap(fp, q, iters=200, seed=7) != P.paired_bootstrap(fp, q, iters=200, seed=8)
    half = 1.96 * statistics.stdev(d.tolist()) / math.sqrt(d.size)
    assert lo < d.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.1 * half)


def test_holm_and_bh_hand_worked():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04; Holm x4, x3, x2, x1 = .02 .03 .06 .04, running max .02 .03 .06 .06
    assert P.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: m p / rank = .02 .02 .04 .04, running min from the top leaves them
    assert P.benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert P.adjust(p, "holm") == P.holm(p) and P.adjust(p, "bh") == P.benjamini_hochberg(p)
    assert P.adjust(p, "none") == p


def test_adjustments_monotone_capped_nan_passthrough():
    p = [0.2, float("nan"), 0.01, 0.6, 0.04]
    for method in ("holm", "bh"):
        out = P.adjust(p, method)
        assert math.isnan(out[1])
        finite = [(raw, adj) for raw, adj in zip(p, out) if not math.isnan(raw)]
        assert all(0 <= raw <= adj <= 1 for raw, adj in finite)
        by_raw = [adj for _, adj in sorted(finite)]
        assert by_raw == sorted(by_raw)
    # the NaN is not counted in m: m = 4 here
    assert P.holm(p)[2] == pytest.approx(0.04)
    assert P.benjamini_hochberg(p)[2] == pytest.approx(0.04)
    assert P.holm([0.5, 0.9]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="bogus"):
        P.adjust(p, "bogus")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.holm([1.5])


def test_agresti_min_hand_value():
    pair = P.align(*records(), "acc")
    d, se = P.agresti_min(P.flips(pair.fp, pair.q))
    # add 1/2 to each cell: 22 items, p12 = 5.5/22 (right->wrong), p21 = 1.5/22
    p12, p21 = 5.5 / 22, 1.5 / 22
    assert d == pytest.approx(p21 - p12)
    assert se == pytest.approx(math.sqrt((p12 + p21 - (p21 - p12) ** 2) / 22), rel=1e-12)


def unchanged(n: int, right: int) -> tuple[list[int], list[int]]:
    x = [1] * right + [0] * (n - right)
    return x, list(x)


def test_zero_flips_small_sample_is_not_certainty():
    r4 = P.retained(*unchanged(4, 2), higher_is_better=True)
    r400 = P.retained(*unchanged(400, 200), higher_is_better=True)
    # Agresti-Min: se_d = sqrt(1) / (n + 2), divided by the FP accuracy 0.5
    assert r4.value == 1.0 and r4.se == pytest.approx((1 / 6) / 0.5)
    assert r400.se == pytest.approx((1 / 402) / 0.5)
    assert r4.low == pytest.approx(1 - 1.96 / 3) and r4.high == pytest.approx(1 + 1.96 / 3)
    assert r4.low < 0.98 < r4.high
    assert (r4.high - r4.low) > 50 * (r400.high - r400.low)
    assert r4.p_diff == 1.0 and r4.p_below(0.98) == pytest.approx(0.5 * math.erfc(-0.06 / math.sqrt(2)))

    v4 = P.verdict(r4, 0.98, r4.p_below(0.98), r4.p_diff)
    assert v4.verdict == "inconclusive"
    assert v4.n_needed == math.ceil(4 * (1.96 * (1 / 3) / 0.02) ** 2)
    assert P.needed_n(r4, 0.98) == v4.n_needed
    assert r400.low == pytest.approx(1 - 1.96 * 2 / 402)
    assert P.verdict(r400, 0.98, r400.p_below(0.98), r400.p_diff).verdict == "within"


def test_clear_within_and_clear_loss():
    r = P.retained(*unchanged(5000, 3000), higher_is_better=True)
    assert r.low == pytest.approx(1 - 1.96 / 5002 / 0.6)
    assert P.verdict(r, 0.98, r.p_below(0.98), r.p_diff) == P.Verdict("within", 0.98, None)

    # 500 items, FP right on 300; 60 go right->wrong, 5 wrong->right
    fp = [1] * 300 + [0] * 200
    q = [1] * 240 + [0] * 60 + [1] * 5 + [0] * 195
    loss = P.retained(fp, q, higher_is_better=True)
    assert loss.value == pytest.approx(245 / 300)
    assert loss.p_diff == pytest.approx(float(2 * exact_cdf(5, 65)), rel=1e-10)
    assert loss.high < 0.98 and loss.p_below(0.98) < 1e-6
    # adjusted together with the two zero-flip cells above: still far below alpha
    small = P.retained(*unchanged(4, 2), higher_is_better=True)
    p_below = P.holm([loss.p_below(0.98), small.p_below(0.98), r.p_below(0.98)])
    p_diff = P.holm([loss.p_diff, small.p_diff, r.p_diff])
    assert P.verdict(loss, 0.98, p_below[0], p_diff[0]).verdict == "loss"
    # a significant drop without a significant paired difference stays inconclusive
    assert P.verdict(loss, 0.98, p_below[0], 0.2).verdict == "inconclusive"


def test_perplexity_log_scale():
    nll_fp = [2.0, 2.5, 3.0, 2.2]
    inc = [0.1, 0.05, 0.2, 0.15]
    nll_q = [a + b for a, b in zip(nll_fp, inc)]
    ppl_fp = math.exp(sum(nll_fp) / 4)
    ppl_q = math.exp(sum(nll_q) / 4)
    r = P.retained(nll_fp, nll_q, higher_is_better=False, log_scale=True)
    assert r.value == pytest.approx(ppl_fp / ppl_q, rel=1e-12)
    se = statistics.stdev(inc) / 2
    assert r.se == pytest.approx(se, rel=1e-9)
    assert r.low == pytest.approx(math.exp(-0.125 - 1.96 * se), rel=1e-9)
    assert r.high == pytest.approx(math.exp(-0.125 + 1.96 * se), rel=1e-9)
    assert r.p_diff == pytest.approx(2 / 16)  # every window worse: sign test 4 of 4
    # one-sided test on the log scale
    assert r.p_below(0.9) == pytest.approx(0.5 * math.erfc(-(-0.125 - math.log(0.9)) / se / math.sqrt(2)))
    with pytest.raises(ValueError, match="log scale"):
        P.retained(nll_fp, nll_q, higher_is_better=False)


def test_undefined_cases_give_nan_not_errors():
    r = P.retained([0, 0, 0], [0, 1, 0], higher_is_better=True)  # FP accuracy 0: no ratio
    assert math.isnan(r.value) and r.n == 3
    v = P.verdict(r, 0.98, math.nan, r.p_diff)
    assert v.verdict == "inconclusive" and v.n_needed is None
    empty = P.retained([], [], higher_is_better=True)
    assert empty.n == 0 and math.isnan(empty.low)
    with pytest.raises(ValueError, match="keep"):
        P.verdict(P.retained([1, 1], [1, 1], True), 0.0, 0.5, 0.5)
