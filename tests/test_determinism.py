"""The same config run twice (separate processes, separate stores) gives identical numbers on CPU:
every seed comes from the config, calibration sampling included."""

from __future__ import annotations

import json

from conftest import require_eval_data


def _metrics(root):
    records = [json.loads(p.read_text()) for p in root.glob("*.json")]
    return {(r["cell"]["quant"], r["cell"]["method"]): r["metrics"] for r in records}, {r["hash"] for r in records}


def test_same_config_twice_gives_identical_numbers(tmp_path, run_qeval):
    require_eval_data()
    args = [
        "model=tiny-llama",
        "suite=tiny",
        "quant=w4g128,w4a8kv4",
        "method=gptq",
        "calib.nsamples=4",
        "calib.seqlen=128",
        "sweep_name=det",
    ]
    first = run_qeval(args + [f"results_dir={tmp_path / 'a'}"], tmp_path, timeout=400)
    second = run_qeval(args + [f"results_dir={tmp_path / 'b'}"], tmp_path, timeout=400)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    (metrics_a, hashes_a), (metrics_b, hashes_b) = _metrics(tmp_path / "a" / "det"), _metrics(tmp_path / "b" / "det")
    assert len(metrics_a) == 2 and hashes_a == hashes_b
    assert metrics_a == metrics_b  # exact: every float, every stderr, every sample count
    # and not trivially equal: the two specs give different numbers
    assert metrics_a[("w4g128", "gptq")]["wikitext2"]["ppl"] != metrics_a[("w4a8kv4", "gptq")]["wikitext2"]["ppl"]
