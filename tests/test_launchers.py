"""Hydra launchers run the same cells to the same numbers: a 2-worker joblib sweep against the
basic (sequential) launcher on tiny-model cells."""

from __future__ import annotations

import json

import pytest
from conftest import require_eval_data

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed "
                                                                   "(pip install -e '.[dev]')")

CELLS = ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128,w8a8,kv4", "sweep_name=launch"]


def _records(root):
    return {r["hash"]: r for r in (json.loads(p.read_text()) for p in (root / "launch").glob("*.json"))}


def test_joblib_two_workers_match_the_basic_launcher(tmp_path, run_qeval):
    require_eval_data()
    basic = run_qeval(CELLS + [f"results_dir={tmp_path / 'basic'}"], tmp_path, timeout=400)
    joblib = run_qeval(CELLS + ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                f"results_dir={tmp_path / 'joblib'}"], tmp_path, timeout=400)
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert joblib.returncode == 0, joblib.stderr[-3000:]
    a, b = _records(tmp_path / "basic"), _records(tmp_path / "joblib")
    assert len(a) == 4 and a.keys() == b.keys()
    for cell_hash in a:
        assert a[cell_hash]["status"] == b[cell_hash]["status"] == "ok"
        assert a[cell_hash]["metrics"] == b[cell_hash]["metrics"]
    # the joblib cells really ran in two worker processes, the basic ones in one
    assert len({r["host"]["pid"] for r in a.values()}) == 1
    assert len({r["host"]["pid"] for r in b.values()}) == 2
    assert "4 cells planned and validated" in joblib.stdout + joblib.stderr
