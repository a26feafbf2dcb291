"""The Ray and SLURM launchers on real clusters started on this machine (benchmarks/cluster_launchers.py):
a Ray head node on 127.0.0.1, and a single-node slurmctld + slurmd (Debian's slurm-wlm, needs root).
Each runs the 4-cell tiny sweep of test_launchers.py and must give the basic launcher's records.
A cluster that is not installed or does not start is skipped, saying why."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import require_eval_data

pytestmark = pytest.mark.slow  # a cluster start, then four cells in fresh processes: minutes

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cluster_launchers.py"


def _load():
    spec = importlib.util.spec_from_file_location("cluster_launchers", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cl = _load()


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    require_eval_data()
    return cl.run_basic(tmp_path_factory.mktemp("clusters"))


@pytest.mark.parametrize("name", sorted(cl.CLUSTERS))
def test_cluster_launcher_matches_the_basic_launcher(name, basic, tmp_path):
    try:
        row = cl.run_on_cluster(name, tmp_path, basic)
    except cl.ClusterUnavailable as e:
        pytest.skip(f"{name} cluster not available: {e}")
    assert row["problems"] == [], "\n".join(row["problems"])
    assert (row["cells"], row["ok"], row["identical"]) == (4, 4, 4)
