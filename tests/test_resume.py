"""Resume and failure isolation through the real CLI.

* ``kill -9`` in the middle of a sweep (one cell recorded, the next one half-evaluated)
  leaves only readable result files; the same command then recomputes no finished cell,
  reuses the finished task of the half-done cell, and ends with the numbers of an
  uninterrupted sweep.
* A cell that fails at run time is recorded with its error, the other cells run, the
  summary names it, and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import _script, require_eval_data

from qeval.results import read_record

SWEEP = ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128,w8a8", "sweep_name=kill"]


def _files(folder: Path) -> list[Path]:
    """The JSON files of a folder, without the temporaries of a writer killed mid-write
    (``.tmp-*.json``: never read as results, removed once stale)."""
    return [p for p in folder.glob("*.json") if not p.name.startswith(".")]


def _results(sweep_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in _files(sweep_dir)}


def _kill_mid_cell(args: list[str], cwd: Path, sweep_dir: Path, timeout: float = 300) -> None:
    """Start the sweep and SIGKILL its whole process group once one cell is recorded and the
    next has its first task (of two) on disk, so both kinds of progress are at stake."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", QEVAL_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    proc = subprocess.Popen(
        _script("qeval") + args,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended (exit {proc.returncode}) before it could be killed")
            recorded = {p.stem.rpartition("-")[2] for p in _files(sweep_dir)}
            half_done = [
                p
                for p in _files(sweep_dir / ".partial")
                if p.stem not in recorded and len((read_record(p) or {}).get("tasks", ())) == 1
            ]  # wikitext2 done, lambada not
            if recorded and half_done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.02)
        pytest.fail("the sweep made no progress to kill")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kill_9_then_resume(tmp_path, qeval_in_process):
    require_eval_data()
    sweep_dir = tmp_path / "killed" / "kill"
    _kill_mid_cell(SWEEP + [f"results_dir={tmp_path / 'killed'}"], tmp_path, sweep_dir)

    # nothing corrupt: every result file reads, and every one is a finished cell
    survivors = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in _files(sweep_dir)}
    assert 1 <= len(survivors) < 3
    for name in survivors:
        record = read_record(sweep_dir / name)
        assert record is not None and record["status"] == "ok", name
    partial = [read_record(p) for p in _files(sweep_dir / ".partial")]
    assert len(partial) == 1 and partial[0] is not None
    kept_tasks = set(partial[0]["tasks"])
    assert kept_tasks == {"wikitext2"}

    resumed = qeval_in_process(SWEEP + [f"results_dir={tmp_path / 'killed'}"], tmp_path, timeout=400)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"({len(survivors)} already finished)" in out
    assert out.count("quantized in") == 3 - len(survivors)  # finished cells are not recomputed
    assert "kept from an interrupted run" in out
    for name, (data, mtime) in survivors.items():  # and their files are untouched
        assert (sweep_dir / name).read_bytes() == data and (sweep_dir / name).stat().st_mtime_ns == mtime
    assert not _files(sweep_dir / ".partial")  # dropped once their cells were recorded

    clean = qeval_in_process(SWEEP + [f"results_dir={tmp_path / 'clean'}"], tmp_path, timeout=400)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = _results(sweep_dir), _results(tmp_path / "clean" / "kill")
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        assert a[name]["metrics"] == b[name]["metrics"], name


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, qeval_in_process):
    require_eval_data()
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    # a config and a tokenizer file, so preflight passes; loading fails (the tokenizer is empty)
    small = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    (not_a_model / "config.json").write_text(json.dumps({**small, "num_attention_heads": 2, "vocab_size": 300}))
    (not_a_model / "tokenizer.json").write_text("{}")
    proc = qeval_in_process(
        [
            "model=tiny-llama,local",
            f"model.path={not_a_model}",
            "quant=fp16",
            "suite=tiny",
            "sweep_name=fail",
            f"results_dir={tmp_path / 'results'}",
        ],
        tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    records = {r["cell"]["model"]: r for r in _results(tmp_path / "results" / "fail").values()}
    assert records["tiny-llama"]["status"] == "ok"
    failed = records["local-model"]
    assert failed["status"] == "failed" and failed["reason"] and "Traceback" in failed["traceback"]
    assert "(1 failed, 1 ok)" in out
    assert f"failed: {failed['label']} ({failed['reason']}" in out
    # the table printed at the end and the report list it too, with its reason
    assert "cells without scores (failed, skipped or unreadable)" in out
    from qeval.report.write import write_tables

    markdown, files = write_tables(tmp_path / "results" / "fail", tmp_path / "report")
    assert failed["reason"].split("\n")[0][:60] in (tmp_path / "report" / "not_run.md").read_text()
    assert "Failed, skipped and unreadable cells" in (tmp_path / "report" / "report.html").read_text()
