"""Shared helpers: running the real ``qeval`` / ``qeval-report`` entry points, in a subprocess
(true CLI smoke tests: process exit codes, a fresh interpreter, kill -9) or in this process
(everything else: the same entry point and output, without paying interpreter start-up, imports
and lm-eval's task index again for every call)."""

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


# never touch the network: the Hub is unreachable and must not be waited for
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "QEVAL_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def run_script(name: str, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(_script(name) + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_qeval():
    """``run_qeval(args, cwd, timeout)``: the ``qeval`` CLI in a subprocess."""

    def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return run_script("qeval", args, cwd, timeout)

    return run


def _flush_handlers(handler_list: list | None = None) -> None:
    import logging

    for ref in handler_list if handler_list is not None else logging._handlerList[:]:
        handler = ref() if callable(ref) and not hasattr(ref, "flush") else ref
        try:
            if handler is not None:
                handler.flush()
        except (OSError, ValueError):
            pass


def run_in_process(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``qeval`` or ``qeval-report`` called as its console script would be, in this process: argv,
    working directory and environment set, stdout/stderr captured (Hydra's log handlers are created
    during the run, so they write into the capture), the exit status taken from SystemExit, and
    the process state (argv, cwd, environment, logging, Hydra's global state) restored after."""
    import contextlib
    import io
    import logging
    from unittest import mock

    from hydra.core.global_hydra import GlobalHydra

    if name == "qeval":
        from qeval.cli import main as entry
    else:
        from qeval.report.cli import main as entry
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    code = 0
    try:
        os.environ.update(OFFLINE_ENV)
        os.chdir(cwd)
        sys.argv = [name, *args]
        GlobalHydra.instance().clear()
        # Hydra configures logging with dictConfig, which closes every handler created so far in
        # the process; a handler an earlier test left (absl's, imported by rouge_score, holds the
        # test's captured stderr) would then close pytest's own stream. A fresh process has no
        # such handlers: here they are flushed, not closed.
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            mock.patch.object(logging, "shutdown", _flush_handlers),
        ):
            try:
                result = entry() if name == "qeval" else entry(args)
                code = result if isinstance(result, int) else 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def qeval_in_process():
    """``qeval_in_process(args, cwd, timeout)``: the ``qeval`` entry point in this process (the
    timeout is accepted for the same call shape as ``run_qeval`` and not enforced)."""

    def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return run_in_process("qeval", args, cwd)

    return run


@pytest.fixture(scope="session")
def report_in_process():
    """``report_in_process(args, cwd)``: ``qeval-report`` in this process."""

    def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_in_process("qeval-report", args, cwd)

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
