"""Shared helpers: running the real ``qeval`` / ``qeval-report`` entry points in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _script(name: str) -> list[str]:
    """The console script installed beside this interpreter (fallback: PATH, then -m)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {"qeval": "qeval.cli", "qeval-report": "qeval.report.cli", "qeval-stats": "qeval.stats.cli"}[name]
    return [sys.executable, "-m", module]


def run_script(name: str, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # never touch the network: the Hub is unreachable and must not be waited for
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        QEVAL_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(_script(name) + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_qeval():
    """``run_qeval(args, cwd, timeout)``: the ``qeval`` CLI in a subprocess."""

    def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return run_script("qeval", args, cwd, timeout)

    return run


@pytest.fixture(scope="session")
def run_report():
    """``run_report(args, cwd, timeout)``: the ``qeval-report`` CLI in a subprocess."""

    def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_script("qeval-report", args, cwd, timeout)

    return run


EVAL_FILES = ("wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt", "lambada/lambada_test.jsonl")


def require_eval_data() -> None:
    """Skip (saying why) when the offline evaluation files are not under the data directory."""
    from qeval.data import data_dir, local_file

    missing = [f for f in EVAL_FILES if local_file(f) is None]
    if missing:
        pytest.skip(f"evaluation data {missing} not found under {data_dir()}; set QEVAL_DATA_DIR")


def outlier_llama(gain: float):
    """A tiny llama whose norms give one channel a large gain (the activation-outlier
    pattern of real LLMs), for tests of outlier-handling methods."""
    import torch

    from qeval.models.tiny import build_tiny_model

    m = build_tiny_model("llama")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[5] = gain
            layer.post_attention_layernorm.weight[7] = gain
    return m
