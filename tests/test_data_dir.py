"""A cell's data_dir reaches every loader as an argument (lm-eval's included), not through the
process environment."""

from __future__ import annotations

import os
import shutil

from conftest import require_eval_data

from qeval.data import data_dir as default_data_dir
from qeval.eval.harness import evaluate_lm_eval
from qeval.models.tiny import build_tiny_model, byte_tokenizer


def test_lm_eval_loaders_read_the_data_dir_they_are_given(tmp_path, monkeypatch):
    require_eval_data()
    source = default_data_dir() / "lambada" / "lambada_test.jsonl"
    mine = tmp_path / "data" / "lambada"
    mine.mkdir(parents=True)
    (mine / "lambada_test.jsonl").write_text("".join(source.read_text().splitlines(keepends=True)[:3]))
    before = os.environ.get("QEVAL_DATA_DIR")
    model, tok = build_tiny_model("llama"), byte_tokenizer()
    mine_metrics = evaluate_lm_eval(model, tok, "qeval_lambada_openai", batch_size=4, data_dir=str(tmp_path / "data"))
    assert mine_metrics["samples"] == 3  # the 3-line file, not the 5,153-line default
    assert os.environ.get("QEVAL_DATA_DIR") == before  # nothing written to the environment
    default = evaluate_lm_eval(model, tok, "qeval_lambada_openai", limit=5, batch_size=4)
    assert default["samples"] == 5
    shutil.rmtree(tmp_path / "data")
