"""Families beyond the five every method supports: KV quantization reaches every attention
family and is refused where no layer keeps keys and values; weight coverage on a state-space
model names what is not a matmul weight."""

from __future__ import annotations

import pytest
import torch

from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
from qeval.models.tiny import TINY_DENSE_FAMILIES, TINY_FAMILIES, TINY_MOE_FAMILIES, build_tiny_model
from qeval.quant import coverage
from qeval.quant.apply import quantize_model
from qeval.quant.kv import KV_LAYERS_ATTR
from qeval.quant.methods import METHODS, UnsupportedCellError

KV4 = QuantSpec(name="kv4", kv=KVSpec(bits=4))
ATTENTION_FAMILIES = sorted(TINY_FAMILIES) + sorted(TINY_DENSE_FAMILIES) + sorted(TINY_MOE_FAMILIES) + ["falcon_h1"]


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_kv4_changes_the_logits_of_every_attention_family(family):
    model = build_tiny_model(family)
    x = torch.randint(3, 250, (1, 24))
    with torch.no_grad():
        ref = model(x).logits
        quantize_model(model, KV4, METHODS["rtn"]())
        out = model(x).logits
    assert (out - ref).abs().max() > 1e-3
    stored, total = getattr(model, KV_LAYERS_ATTR)
    assert stored == total == model.config.num_hidden_layers


def test_kv_on_a_state_space_model_is_refused_not_a_silent_no_op():
    """Mamba ignores a KV cache: a KV4 cell would report the unquantized model's numbers."""
    model = build_tiny_model("mamba")
    with pytest.raises(UnsupportedCellError, match=r"KV quantization on 'mamba': none of its 2 layers"):
        quantize_model(model, KV4, METHODS["rtn"]())
    w4kv4 = QuantSpec(name="w4kv4", w=WeightSpec(bits=4, group_size=32), kv=KVSpec(bits=4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedCellError, match="state-space"):
        quantize_model(model, w4kv4, METHODS["rtn"]())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any weight moved


def test_w4_on_mamba_quantizes_its_projections_and_names_what_it_leaves():
    model = build_tiny_model("mamba")
    spec = QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32))
    x = torch.randint(3, 250, (1, 16))
    with torch.no_grad():
        ref = model(x).logits
        quantize_model(model, spec, METHODS["rtn"]())
        assert (model(x).logits - ref).abs().max() > 1e-3
    account = coverage.account(model, spec)
    coverage.check(account, spec)
    record = account.as_record()
    assert record["share"] == 1.0
    assert record["kinds"]["state_space"]["quantized"] > 0
    reasons = {g["reason"] for g in record["full_precision"] if g["status"] == "unsupported"}
    assert any("Conv1d kernel" in r for r in reasons) and any("'A_log'" in r for r in reasons)


def test_w8a8_on_mamba_says_dt_proj_inputs_stay_in_full_precision():
    """Mamba multiplies by dt_proj.weight itself, never calling the module: its weight is
    quantized (the model reads the quantized .weight) but an input quantizer would never run,
    so the record says its input stays in full precision, and why, instead of claiming it."""
    model = build_tiny_model("mamba")
    spec = QuantSpec(
        name="w8a8", w=WeightSpec(bits=8, granularity="channel"), a=ActivationSpec(bits=8, granularity="token")
    )
    quantize_model(model, spec, METHODS["rtn"]())
    dt_proj = model.backbone.layers[0].mixer.dt_proj
    assert dt_proj.input_quantizer is None and model.backbone.layers[0].mixer.in_proj.input_quantizer is not None
    record = coverage.account(model, spec).as_record()
    (left,) = record["inputs_full_precision"]
    assert left["tensors"] == 2 and "never calls this linear" in left["reason"]
    assert left["examples"] == [f"backbone.layers.{i}.mixer.dt_proj.weight" for i in range(2)]
    assert 0.95 < record["inputs_quantized_share"] < 1.0 and record["share"] == 1.0


def test_kv_on_a_hybrid_model_quantizes_its_attention_and_says_what_it_leaves(tmp_path):
    """Falcon-H1 runs attention and a Mamba mixer in every layer: KV4 quantizes the attention
    layers' keys and values, and the record says the mixers' states are not quantized."""
    from conftest import require_eval_data

    require_eval_data()
    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.runner import run_cell

    args = ["model=tiny-falcon-h1", "suite=tiny", "~suite.tasks.lambada", "quant=kv4", f"results_dir={tmp_path}"]
    record = run_cell(build_cell(compose_config(args)))
    assert record["status"] == "ok"
    kv = record["coverage"]["kv"]
    assert kv["layers"] == kv["cache_layers"] == 2 and kv["state_space_mixers"] == 2
    assert "not quantized" in kv["note"]


def test_kv_on_latent_attention_quantizes_the_latent_cache_and_says_so(tmp_path):
    """DeepSeek-V3's cache holds the compressed latent and the shared rotary key, not per-head
    keys and values: KV4 quantizes those (the logits move) and the record says what they are."""
    from conftest import require_eval_data

    require_eval_data()
    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.runner import run_cell

    args = ["model=tiny-deepseek-v3", "suite=tiny", "~suite.tasks.lambada", "quant=kv4", f"results_dir={tmp_path}"]
    record = run_cell(build_cell(compose_config(args)))
    assert record["status"] == "ok"
    assert (
        "latent (32 wide)" in record["coverage"]["kv"]["cache"]
        and "rotary key (8 wide)" in record["coverage"]["kv"]["cache"]
    )


@pytest.mark.parametrize(
    ("model", "method", "quant", "reason"),
    [
        ("tiny-olmo2", "awq", "w4g128", "post-norms"),
        ("tiny-olmo2", "smoothquant", "w8a8", "post-norms"),
        ("tiny-olmo2", "quarot", "w4g128", "post-norms"),
        ("tiny-mixtral", "quarot", "w4g128", "rotate every fused expert tensor"),
        ("tiny-qwen3-moe", "omniquant", "w8a8", "LET (weight-activation cells) does not scale fused experts"),
        ("tiny-deepseek-v3", "quarot", "w4g128", "interleaved per head"),
        ("tiny-gpt-neox", "quarot", "w4g128", "LayerNorm subtracts the mean"),
        ("tiny-mamba", "quarot", "w4g128", "state-space mixers"),
        ("tiny-falcon-h1", "quarot", "w4g128", "Mamba mixer writes to the residual stream"),
        ("tiny-gemma2", "quarot", "w4g128", "do not commute with a rotation"),
        ("tiny-opt", "quarot", "w8a8", "LayerNorm subtracts the mean"),
    ],
)
def test_architecture_refusals_come_before_any_weight_loads(tmp_path, monkeypatch, model, method, quant, reason):
    from conftest import require_eval_data

    require_eval_data()
    from qeval import runner
    from qeval.cell import build_cell
    from qeval.cli import compose_config

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_model", no_load)
    args = [f"model={model}", "suite=tiny", f"quant={quant}", f"method={method}", f"results_dir={tmp_path}"]
    record = runner.run_cell(build_cell(compose_config(args)))
    assert record["status"] == "skipped" and reason in record["reason"]
