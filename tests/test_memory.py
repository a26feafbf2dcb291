"""Sizes a user can plan with (qeval.memory): a cell's expected peak memory from its model's
config, before any weight loads, and a sweep that cannot fit refused before it starts."""

from __future__ import annotations

import pytest

from qeval.cell import build_cell
from qeval.cli import compose_config
from qeval.memory import RUNTIME_BYTES, SweepTooLarge, estimate, parameter_count, plan_memory
from qeval.models.tiny import ALL_TINY_FAMILIES, build_tiny_model


def _cell(*overrides: str):
    return build_cell(compose_config(["model=tiny-llama", "suite=tiny", *overrides]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "gemma3"])
def test_parameters_are_counted_without_memory_as_a_loaded_model_has_them(family):
    """Counted on the meta device, tied embeddings once: the same number a built model has."""
    model = build_tiny_model(family)
    built = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert parameter_count(ALL_TINY_FAMILIES[family]()) == built


def test_the_estimate_is_made_of_the_cells_own_sizes():
    """Weights at the model's dtype, calibration only for a method that reads it, KV for the
    suite's longest window; bfloat16 halves the weights and the KV cache."""
    config = ALL_TINY_FAMILIES["llama"]()
    params = parameter_count(config)
    rtn = estimate(_cell("quant=w4g128", "method=rtn"), config)
    assert rtn.weights == 4 * params and rtn.calibration == 0 and rtn.runtime == RUNTIME_BYTES
    gptq = estimate(_cell("quant=w4g128", "method=gptq", "calib.nsamples=8", "calib.seqlen=64"), config)
    hidden, inter = config.hidden_size, config.intermediate_size
    assert gptq.calibration == 2 * 8 * 64 * hidden * 4 + 2 * max(hidden, inter) ** 2 * 4
    tokens = 2048  # the lambada entry (an lm-eval task: no length of its own) outlasts 128-token windows
    head_dim = config.head_dim
    assert rtn.kv == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 4
    half = estimate(_cell("quant=w4g128", "method=rtn", "model.dtype=bfloat16"), config)
    assert half.weights * 2 == rtn.weights and half.kv * 2 == rtn.kv
    assert rtn.total == rtn.weights + rtn.calibration + rtn.kv + rtn.activations + rtn.runtime


def test_a_sweep_that_cannot_fit_is_refused_naming_the_numbers():
    cells = [_cell("quant=fp16"), _cell("quant=w4g128", "method=gptq")]
    line = plan_memory(cells, limit_gib=64)
    assert line.startswith("sweep: expected peak memory") and "tiny-llama__w4g128__gptq" in line  # the worst
    with pytest.raises(SweepTooLarge, match=r"needs about 1\.\d\d GiB .*memory_limit_gib=0\.25 is 0\.25 GiB"):
        plan_memory(cells, limit_gib=0.25)


def test_the_cli_refuses_before_any_cell_runs(tmp_path, qeval_in_process):
    proc = qeval_in_process(
        ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128", f"results_dir={tmp_path}", "memory_limit_gib=0.25"],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the sweep would run out of memory" in proc.stderr and "nothing was run" in proc.stderr
    assert not list(tmp_path.glob("**/*.json"))  # no cell ran
    bad = qeval_in_process(["model=tiny-llama", "suite=tiny", "memory_limit_gib=-1"], tmp_path, timeout=60)
    assert bad.returncode == 2 and "memory_limit_gib" in bad.stderr


def test_a_gpu_cell_is_planned_against_the_gpus_free_memory(monkeypatch):
    """On a machine with the cell's GPU, the sweep's line says whether the model will be
    resident there or offloaded one block at a time; a GPU where not even one block fits is
    refused before anything runs.  (The GPU is simulated: the decision is arithmetic.)"""
    import torch

    from qeval import placement

    monkeypatch.setattr(placement, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cell = _cell("quant=w4g128", "method=gptq", "backend.device=cuda")
    weights = estimate(cell, ALL_TINY_FAMILIES["llama"]()).weights
    monkeypatch.setattr(placement, "free_bytes", lambda _device: 64 * 2**30)
    assert "on cuda: resident" in plan_memory([cell], limit_gib=64)
    # room for one block and its work, not for the whole model beside a block's work
    block = weights // ALL_TINY_FAMILIES["llama"]().num_hidden_layers
    usable = block * (1 + placement.BLOCK_WORK_FACTOR) * 1.05
    assert usable < weights + block * placement.BLOCK_WORK_FACTOR
    monkeypatch.setattr(placement, "free_bytes", lambda _device: int(usable / placement.USABLE_SHARE))
    assert "on cuda: offloaded" in plan_memory([cell], limit_gib=64)
    monkeypatch.setattr(placement, "free_bytes", lambda _device: 1024)
    with pytest.raises(SweepTooLarge, match="one decoder block"):
        plan_memory([cell], limit_gib=64)
