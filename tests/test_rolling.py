"""Rolling log-likelihood (document perplexity) at a batch that fits in memory: the bound's
arithmetic on known sizes, and on a real lm-eval task that the bound changes the batch the
model sees but not one score."""

from __future__ import annotations

import logging

import pytest
import torch

from qeval.data import data_dir, local_file
from qeval.eval import rolling
from qeval.eval.rolling import LOGITS_COPIES, rolling_batch_size

GIB = 2**30
WIKITEXT = "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt"


def test_bound_on_smollm2_sizes() -> None:
    # SmolLM2: 8,192-token windows over 49,152 tokens -> 4.5 GiB of logits per window (3 copies)
    per_window = LOGITS_COPIES * 8192 * 49152 * 4
    assert per_window == 4_831_838_208
    assert rolling_batch_size(16, 8192, 49152, 24 * GIB) == 5  # 24 GiB // 4.5 GiB
    assert rolling_batch_size(16, 8192, 49152, 4 * GIB) == 1  # less than one window: still one
    assert rolling_batch_size(4, 2048, 32000, 24 * GIB) == 4  # what the suite asked for fits: kept
    assert rolling_batch_size(16, 2048, 32000, per_window) == 6  # 4.5 GiB // 0.73 GiB


def _wikitext_run(monkeypatch, available: int) -> tuple[dict, list[int]]:
    from qeval.eval.harness import evaluate_lm_eval
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    model, tok = build_tiny_model("llama"), byte_tokenizer()
    batches: list[int] = []

    def record_batch(_module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        batches.append(int(ids.shape[0]))

    model.register_forward_pre_hook(record_batch, with_kwargs=True)
    monkeypatch.setattr(rolling, "available_bytes", lambda: available)
    with torch.no_grad():
        out = evaluate_lm_eval(model, tok, "qeval_wikitext", limit=1, batch_size=8)
    return out, batches


def test_bounded_batch_scores_the_same(monkeypatch, caplog) -> None:
    if local_file(WIKITEXT) is None:
        pytest.skip(f"{WIKITEXT} not found under {data_dir()}; set QEVAL_DATA_DIR")
    # the tiny llama: 512-token windows over 259 byte tokens
    per_window = LOGITS_COPIES * 512 * 259 * 4
    free, free_batches = _wikitext_run(monkeypatch, available=10**12)
    with caplog.at_level(logging.INFO, logger="qeval.eval.rolling"):
        tight, tight_batches = _wikitext_run(monkeypatch, available=int(2.5 * per_window / rolling.BUDGET_SHARE))
    assert max(free_batches) == 8  # the article is many windows: the suite's batch of 8 is used
    assert max(tight_batches) == 2 and len(tight_batches) > len(free_batches)
    assert "batch 8 -> 2" in caplog.text
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert tight[metric] == pytest.approx(free[metric], rel=1e-6)
