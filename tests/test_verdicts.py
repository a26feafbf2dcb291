"""The report's paired comparison reading per-item values the way lm-eval keeps them."""

from __future__ import annotations

import math

import pytest

from qeval.report.verdicts import compare_task


def test_document_perplexity_pairs_are_compared_per_document() -> None:
    """lm-eval keeps word_perplexity per document as (log-likelihood, words), stored as text:
    each document's own perplexity is compared (lower is better, geometric mean)."""
    info = {"primary_metric": "word_perplexity", "higher_is_better": False}
    ids = [str(i) for i in range(8)]
    fp = {"id": ids, "word_perplexity": [f"({-2.0 * (100 + i)}, {100 + i})" for i in range(8)]}  # e^2 each
    q = {"id": ids, "word_perplexity": [(-3.0 * (100 + i), 100 + i) for i in range(8)]}  # e^3 each
    out = compare_task(fp, q, info)
    assert out["test"] == "sign" and out["unit"] == "items"
    assert out["ret"].value == pytest.approx(math.exp(-1.0))  # ppl_fp / ppl_q = e^2 / e^3
