"""The perplexity protocol: join rows with blank lines, tokenize once, non-overlapping windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from qeval.backends.hf import HFSettings
from qeval.cell import Cell, validate
from qeval.config import ConfigError, ModelSpec, SuiteSpec, TaskEntry
from qeval.data import DataNotFoundError, check_available, load_text
from qeval.eval.perplexity import perplexity
from qeval.models.tiny import build_tiny_model, byte_tokenizer


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "my_corpus.txt"
    path.write_text("first line of text\r\n\r\nsecond line, a bit longer than the first\r\nthird\r\n" * 12)
    return path


def test_user_text_file_rows_are_joined_with_blank_lines(corpus):
    text = load_text(str(corpus))
    assert text.startswith("first line of text\n\nsecond line, a bit longer than the first\n\nthird\n\nfirst")
    assert "\r" not in text and text.count("\n\n") == 3 * 12 - 1
    check_available(str(corpus))  # a path needs no data directory


def test_perplexity_equals_hand_computed_windows(corpus):
    model, tok = build_tiny_model("llama", seed=0), byte_tokenizer()
    ids = tok(load_text(str(corpus)), return_tensors="pt").input_ids[0]
    seqlen = 64
    n = ids.numel() // seqlen
    with torch.no_grad():
        nlls = [
            F.cross_entropy(
                model(ids[i * seqlen : (i + 1) * seqlen][None]).logits[0, :-1], ids[i * seqlen + 1 : (i + 1) * seqlen]
            ).item()
            for i in range(n)
        ]
    res = perplexity(model, tok, str(corpus), seqlen=seqlen)
    assert res.windows == n and res.tokens == n * (seqlen - 1)
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / n), rel=1e-6)
    sd = torch.tensor(nlls).std().item()
    assert res.ppl_stderr == pytest.approx(res.ppl * sd / math.sqrt(n), rel=1e-5)
    capped = perplexity(model, tok, str(corpus), seqlen=seqlen, max_windows=2)
    assert capped.windows == 2
    assert capped.ppl == pytest.approx(math.exp(sum(nlls[:2]) / 2), rel=1e-6)


def test_corpus_shorter_than_a_window_is_an_error(corpus):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(build_tiny_model("opt"), byte_tokenizer(), str(corpus), seqlen=100_000)


def test_unknown_dataset_is_rejected_naming_the_key():
    cfg = Cell(
        model=ModelSpec(source="tiny", family="llama"),
        method={"rtn": {}},
        backend=HFSettings(),
        suite=SuiteSpec(tasks={"ppl": TaskEntry(kind="perplexity", dataset="no_such_corpus")}),
    )
    with pytest.raises(ConfigError, match=r"suite\.tasks\.ppl\.dataset='no_such_corpus'.*wikitext2"):
        validate(cfg)
    with pytest.raises(DataNotFoundError, match="no_such_corpus"):
        check_available("no_such_corpus")
