"""Hydra launchers run the same cells to the same numbers: a 2-worker joblib sweep and a
submitit-local sweep (one process per cell, SLURM's code path) against the basic (sequential)
launcher on tiny-model cells, through qeval's launcher configs (conf/hydra/launcher/)."""

from __future__ import annotations

import json

import pytest
from conftest import require_eval_data

# one thread everywhere: a joblib worker gets one (loky splits the cores) and the basic launcher
# all of them, and on some CPUs the thread count moves the last bits of a matmul (here, lambada's
# perplexity of a random model, about 1e19: by 0.5 %), which the exact comparison would read as a
# launcher difference
CELLS = ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128,w8a8,kv4", "sweep_name=launch", "backend.threads=1"]


def _records(root):
    return {r["hash"]: r for r in (json.loads(p.read_text()) for p in (root / "launch").glob("*.json"))}


@pytest.fixture(scope="module")
def basic(tmp_path_factory, qeval_in_process):
    require_eval_data()
    tmp = tmp_path_factory.mktemp("basic")
    proc = qeval_in_process(CELLS + [f"results_dir={tmp}"], tmp, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp)
    assert len(records) == 4 and len({r["host"]["pid"] for r in records.values()}) == 1
    return records


def _same_as_basic(basic, proc, root, n_processes: int) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    records = _records(root)
    assert records.keys() == basic.keys()
    for cell_hash, rec in records.items():
        assert rec["status"] == basic[cell_hash]["status"] == "ok"
        assert rec["metrics"] == basic[cell_hash]["metrics"]
    assert len({r["host"]["pid"] for r in records.values()}) == n_processes
    # the sweep's plan, progress and summary work although the cells ran in other processes
    assert "4 cells planned and validated" in out
    assert "(4 ok)" in out


def test_joblib_two_workers_match_the_basic_launcher(basic, tmp_path, run_qeval):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[dev]'")
    proc = run_qeval(
        CELLS + ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "backend.threads=1", f"results_dir={tmp_path}"],
        tmp_path,
        timeout=400,
    )
    _same_as_basic(basic, proc, tmp_path, n_processes=2)


@pytest.mark.slow  # four fresh processes, each importing torch, lm-eval and transformers: minutes
def test_submitit_local_matches_the_basic_launcher(basic, tmp_path, run_qeval):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[dev]'")
    proc = run_qeval(
        CELLS + ["hydra/launcher=local", "backend.threads=1", f"results_dir={tmp_path}"], tmp_path, timeout=600
    )
    _same_as_basic(basic, proc, tmp_path, n_processes=4)  # one process per cell
