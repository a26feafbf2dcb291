"""Tensor statistics: known values, exact combination over batches, every family, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import require_eval_data, run_script

from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.stats.tensors import OUTLIER_FACTOR, _Accumulator, collect, summarize


def test_gaussian_has_kurtosis_three_and_no_outlier_channels():
    x = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0))
    stats = summarize(x)
    assert stats["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert stats["std"] == pytest.approx(1.0, abs=0.01)
    assert stats["outlier_share"] == 0.0


def test_a_planted_outlier_channel_is_counted_and_raises_kurtosis():
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 50  # one channel 50x larger, as in LLM activations
    stats = summarize(x)
    assert stats["outlier_share"] == pytest.approx(1 / 64)
    assert stats["absmax"] == pytest.approx(float(x.abs().max()))
    assert stats["kurtosis"] > 20 and stats["channel_absmax_ratio"] > OUTLIER_FACTOR


def test_statistics_accumulated_over_batches_equal_the_whole():
    x = torch.randn(3000, 32, generator=torch.Generator().manual_seed(2)) ** 3
    acc = _Accumulator()
    for part in x.split(700):
        acc.add(part)
    whole, combined = summarize(x), acc.result()
    for key in ("absmax", "std", "kurtosis", "outlier_share", "channel_absmax_ratio"):
        assert combined[key] == pytest.approx(whole[key], rel=1e-4)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family_gets_weight_activation_and_kv_rows(family):
    from qeval.models.adapters import get_adapter

    model = build_tiny_model(family)
    batches = [torch.randint(3, 200, (2, 32), generator=torch.Generator().manual_seed(3))]
    rows = collect(model, batches, get_adapter(model).blocks)
    kinds = {(r["layer"], r["kind"]) for r in rows}
    assert kinds == {(layer, kind) for layer in range(2) for kind in ("weight", "activation", "key", "value")}
    assert all(r["std"] > 0 and r["kurtosis"] > 1 for r in rows)  # kurtosis >= 1 for any distribution


def test_cli_writes_a_record_and_plots(tmp_path):
    require_eval_data()
    proc = run_script(
        "qeval-stats",
        ["model=tiny-qwen2", "calib.nsamples=2", "calib.seqlen=64", f"results_dir={tmp_path / 'results'}"],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(next((tmp_path / "results" / "stats").glob("stats__tiny-qwen2-*.json")).read_text())
    assert record["kind"] == "tensor_stats" and len(record["rows"]) == 2 * (7 + 7 + 2)
    for name in ("stats_by_layer.png", "stats_by_kind.png", "stats.csv"):
        assert (tmp_path / "plots" / "stats" / "tiny-qwen2" / name).is_file()
    assert "| activation |" in proc.stdout


def test_cli_refuses_a_bad_override_before_loading(tmp_path):
    proc = run_script("qeval-stats", ["model=nope"], tmp_path, timeout=120)
    assert proc.returncode == 2 and "model" in proc.stderr and "nope" in proc.stderr
