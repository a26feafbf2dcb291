"""Methods from the CLI: a method x spec sweep records incompatible cells as skipped."""

from __future__ import annotations

import json

from conftest import require_eval_data


def test_method_sweep_skips_incompatible_cells(tmp_path, qeval_in_process):
    require_eval_data()
    proc = qeval_in_process(
        [
            "model=tiny-opt",
            "suite=tiny",
            "~suite.tasks.lambada",
            "quant=w4g128,w8a8",
            "method=gptq,smoothquant,quarot",
            "calib.nsamples=4",
            "calib.seqlen=128",
            "sweep_name=methods",
            f"results_dir={tmp_path}",
        ],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {
        (r["cell"]["quant"], r["cell"]["method"]): r
        for r in (json.loads(p.read_text()) for p in (tmp_path / "methods").glob("*.json"))
    }
    assert len(records) == 6
    assert records["w4g128", "gptq"]["status"] == "ok"
    assert records["w8a8", "gptq"]["status"] == "ok"
    assert records["w8a8", "smoothquant"]["status"] == "ok"
    # SmoothQuant is for weight-activation cells
    assert records["w4g128", "smoothquant"]["status"] == "skipped"
    assert "tensor type W" in records["w4g128", "smoothquant"]["reason"]
    # QuaRot refuses OPT (LayerNorm), naming the family
    for quant in ("w4g128", "w8a8"):
        assert records[quant, "quarot"]["status"] == "skipped"
        assert "'opt'" in records[quant, "quarot"]["reason"]
    assert "(3 ok, 3 skipped)" in proc.stdout
    assert "skipped: tiny-opt__w4g128__smoothquant" in proc.stdout
    # a sweep without an unquantized cell still gets its whole report (no ratio-to-FP figures)
    assert "raised" not in proc.stderr
    assert list(tmp_path.glob("plots/*/report.html"))


def test_unknown_method_parameter_fails_before_any_work():
    import pytest
    from hydra import compose, initialize_config_dir

    from qeval.cell import preflight
    from qeval.cli import CONF_DIR
    from qeval.config import ConfigError

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=tiny-llama", "suite=tiny", "method=gptq", "+method.gptq.bogus=1"])
        with pytest.raises(ConfigError, match=r"method\.gptq.*bogus"):
            preflight(cfg)
        cfg = compose(
            "config", overrides=["model=tiny-llama", "suite=tiny", "method=smoothquant", "method.smoothquant.alpha=1.5"]
        )
        with pytest.raises(ConfigError, match=r"alpha=1.5"):
            preflight(cfg)
