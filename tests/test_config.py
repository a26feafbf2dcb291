"""Config composition (Hydra) and validation errors that name the offending key."""

from __future__ import annotations

import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException

from qeval.cell import build_cell, register_configs
from qeval.cli import CONF_DIR
from qeval.config import ConfigError, bits_label, tensor_type

TINY = ["model=tiny-llama", "suite=tiny"]
PRESETS = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))


@pytest.fixture
def cell():
    """Compose one cell exactly as the qeval app does (same config dir, same schemas)."""
    register_configs()
    GlobalHydra.instance().clear()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=[*TINY, *overrides])

    yield _compose
    GlobalHydra.instance().clear()


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        build_cell(cfg)
    return str(info.value)


# ---------------------------------------------------------------------------- valid configs


def test_conf_dir_is_the_repository_conf():
    assert (CONF_DIR / "config.yaml").is_file()
    assert {"fp16", "w4g128", "kv4", "w8a8"} <= set(PRESETS)


def test_default_tiny_cell_is_valid(cell):
    cfg = cell()
    build_cell(cfg)
    assert cfg.model.source == "tiny" and cfg.model.family == "llama"
    # fp16: every part present, bits=16 = not quantized
    assert cfg.quant.name == "fp16"
    assert (cfg.quant.w.bits, cfg.quant.a.bits, cfg.quant.kv.bits) == (16, 16, 16)
    assert (tensor_type(cfg.quant), bits_label(cfg.quant)) == ("FP", "FP16")
    assert set(cfg.suite.tasks) == {"wikitext2", "lambada"}
    assert list(cfg.method) == ["rtn"]
    assert build_cell(cfg).recipe.name == "rtn"


EXPECTED_LABELS = {
    "fp16": ("FP", "FP16"),
    "kv4": ("KV", "KV4"),
    "w4g128": ("W", "W4g128"),
    "w2g64": ("W", "W2g64"),
    "w8": ("W", "W8"),
    "w8a8": ("WA", "W8A8"),
    "w4a8kv4": ("WA+KV", "W4A8KV4"),
    "w8a8-fp8": ("WA", "W8A8-FP8"),
    "kv8-fp8": ("KV", "KV8-FP8"),
    "w4a16-nvfp4": ("W", "W4-NVFP4"),
    "w4a4-nvfp4": ("WA", "W4A4-NVFP4"),
    "w4a16-mxfp4": ("W", "W4-MXFP4"),
    "w4a4-mxfp4": ("WA", "W4A4-MXFP4"),
    "w8a8-mxfp8": ("WA", "W8A8-MXFP8"),
    "w8a8-fp8-block": ("WA", "W8A8-FP8B"),
    "kv4-nvfp4": ("KV", "KV4-NVFP4"),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(cell, preset):
    cfg = cell(f"quant={preset}")
    build_cell(cfg)
    assert cfg.quant.name == preset
    if preset in EXPECTED_LABELS:
        assert (tensor_type(cfg.quant), bits_label(cfg.quant)) == EXPECTED_LABELS[preset]


def test_preset_values(cell):
    q = cell("quant=w4g128").quant
    assert (q.w.bits, q.w.granularity, q.w.group_size, q.w.sym, q.w.format) == (4, "group", 128, False, "int")
    assert q.a.bits == 16 and q.kv.bits == 16
    q = cell("quant=w8a8-static").quant
    assert (q.a.bits, q.a.granularity, q.a.dynamic) == (8, "tensor", False)
    q = cell("quant=kv4").quant
    assert (q.kv.bits, q.kv.group_size, q.kv.sym) == (4, -1, False) and q.w.bits == 16


# ---------------------------------------------------------------------------- range errors


@pytest.mark.parametrize("bits", [1, 0, 9, 15, 32])
def test_weight_bits_out_of_range(cell, bits):
    msg = _error(cell("quant=w4g128", f"quant.w.bits={bits}"))
    assert "quant.w.bits" in msg
    assert "2..8" in msg
    assert f"={bits}" in msg


def test_bits_16_means_not_quantized(cell):
    # 16 is the "not quantized" value for every part: valid, and the cell is FP
    cfg = cell("quant=w4g128", "quant.w.bits=16")
    build_cell(cfg)
    assert tensor_type(cfg.quant) == "FP"
    cfg = cell("quant=w4a8kv4", "quant.kv.bits=16")
    build_cell(cfg)
    assert (tensor_type(cfg.quant), bits_label(cfg.quant)) == ("WA", "W4A8")
    # and quantizing activations without weights is refused, naming the keys
    msg = _error(cell("quant=w8a8", "quant.w.bits=16"))
    assert "quant.a.bits" in msg and "quant.w" in msg


def test_fp16_preset_takes_part_overrides(cell):
    # fp16 has every part, so overriding a part of it is an ordinary override
    msg = _error(cell("quant=fp16", "quant.w.bits=1"))
    assert "quant.w.bits" in msg and "2..8" in msg
    cfg = cell("quant=fp16", "quant.kv.bits=4")
    build_cell(cfg)
    assert tensor_type(cfg.quant) == "KV"


def test_weight_group_size_zero(cell):
    msg = _error(cell("quant=w4g128", "quant.w.group_size=0"))
    assert "quant.w.group_size" in msg
    assert "positive" in msg
    # group_size is irrelevant for per-channel weights
    build_cell(cell("quant=w4g128", "quant.w.group_size=0", "quant.w.granularity=channel"))


def test_weight_bad_granularity_and_format(cell):
    msg = _error(cell("quant=w4g128", "quant.w.granularity=row"))
    assert "quant.w.granularity" in msg and "tensor, channel, group, block" in msg
    msg = _error(cell("quant=w4g128", "quant.w.granularity=block"))  # block FP8's tiles only
    assert "quant.w.granularity='block'" in msg and "tensor, channel or group for format int" in msg
    msg = _error(cell("quant=w4g128", "quant.w.format=nf4"))
    assert "quant.w.format" in msg and "fp8_e4m3" in msg


def test_fp8_activation_with_4_bits(cell):
    msg = _error(cell("quant=w8a8", "quant.a.format=fp8_e4m3", "quant.a.bits=4"))
    assert "quant.a.bits" in msg
    assert "8 for format fp8_e4m3" in msg
    # the same format with 8 bits is fine
    build_cell(cell("quant=w8a8", "quant.a.format=fp8_e4m3", "quant.a.bits=8"))


def test_static_per_token_activation_rejected(cell):
    msg = _error(cell("quant=w8a8-static", "quant.a.granularity=token"))
    assert "quant.a.dynamic" in msg


def test_kv_bits_and_group_size(cell):
    build_cell(cell("quant=kv4", "quant.kv.bits=16"))  # 16 = not quantized
    msg = _error(cell("quant=kv4", "quant.kv.bits=9"))
    assert "quant.kv.bits" in msg and "2..8" in msg and "16" in msg
    msg = _error(cell("quant=kv4", "quant.kv.group_size=0"))
    assert "quant.kv.group_size" in msg
    msg = _error(cell("quant=kv4", "quant.kv.key_granularity=head"))
    assert "quant.kv.key_granularity" in msg and "token, channel" in msg


def test_unknown_preset_is_a_hydra_error(cell):
    with pytest.raises(HydraException) as info:
        cell("quant=w5z")
    assert "w5z" in str(info.value)
    assert "w4g128" in str(info.value)  # hydra lists the available presets


def test_unknown_method(cell):
    with pytest.raises(HydraException) as info:  # Hydra lists the registered steps
        cell("method=nope")
    assert "nope" in str(info.value) and "gptq" in str(info.value)
    msg = _error(cell("+method.nope={}"))  # a step added by hand, not registered
    assert "method='nope'" in msg and "rtn" in msg and "smoothquant" in msg


def test_method_parameters_are_typed(cell):
    cfg = build_cell(cell("quant=w4g128", "method=gptq", "method.gptq.damp=0.05"))
    assert cfg.recipe.rounding.damp == 0.05 and cfg.recipe.rounding.block_size == 128
    with pytest.raises(HydraException, match="method.gptq.bogus"):
        cell("quant=w4g128", "method=gptq", "method.gptq.bogus=1")
    msg = _error(cell("quant=w8a8", "method=smoothquant", "method.smoothquant.alpha=1.5"))
    assert "method.smoothquant.alpha=1.5" in msg and "0..1" in msg


def test_recipes_compose_in_order(cell):
    recipe = build_cell(cell("quant=w8a8", "method=[smoothquant,gptq]")).recipe
    assert [s.name for s in recipe.steps] == ["smoothquant", "gptq"] and recipe.name == "smoothquant+gptq"
    alias = build_cell(cell("quant=w8a8", "method=quarot_gptq")).recipe
    assert [s.name for s in alias.steps] == ["quarot", "gptq"]
    assert build_cell(cell("quant=w8a8", "method=smoothquant")).recipe.rounding.name == "rtn"  # implied
    msg = _error(cell("quant=w8a8", "method=[gptq,smoothquant]"))
    assert "smoothquant comes after the rounding gptq" in msg and "method=[smoothquant,gptq]" in msg
    msg = _error(cell("quant=w4g128", "method=[gptq,awq]"))
    assert "two roundings" in msg


def test_model_and_suite_errors(cell):
    msg = _error(cell("model.family=nope"))
    assert "model.family" in msg and "llama" in msg
    msg = _error(cell("suite.tasks.lambada.limit=0"))
    assert "suite.tasks.lambada.limit" in msg
    msg = _error(cell("suite.tasks.wikitext2.seqlen=1"))
    assert "suite.tasks.wikitext2.seqlen" in msg
    msg = _error(cell("calib.nsamples=0"))
    assert "calib.nsamples" in msg


def test_type_errors_fail_at_composition(cell):
    # the structured schema types the presets: a string for an int, or a typo'd key, never compose
    with pytest.raises(HydraException, match="quant.w.bits"):
        cell("quant=w4g128", "quant.w.bits=four")
    with pytest.raises(HydraException, match="quant.w.bitz"):
        cell("quant=w4g128", "quant.w.bitz=4")


# ---------------------------------------------------------------------------- the real CLI


def _json_files(root):
    return sorted(root.rglob("*.json")) if root.exists() else []


def test_cli_bad_bits_on_weight_preset_fails_fast(run_qeval, tmp_path):
    results = tmp_path / "results"
    t0 = time.monotonic()
    proc = run_qeval(["quant=w4g128", "quant.w.bits=1", *TINY, f"results_dir={results}"], tmp_path, timeout=30)
    assert time.monotonic() - t0 < 30
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "quant.w.bits" in out and "2..8" in out
    assert "Traceback" not in out
    assert _json_files(results) == []
    # no model was loaded or quantized
    assert "quantized in" not in out and "loaded tiny-llama" not in out


def test_cli_bad_bits_default_sweep_names_the_key(qeval_in_process, tmp_path):
    # the default config sweeps quant over presets, fp16 first (all parts at bits=16).
    # Before f25681a fp16 had quant.w = null and Hydra died with
    # "AssertionError: Unexpected type for root: NoneType" and a traceback, never naming the key.
    results = tmp_path / "results"
    t0 = time.monotonic()
    proc = qeval_in_process(["quant.w.bits=1", *TINY, f"results_dir={results}"], tmp_path, timeout=30)
    assert time.monotonic() - t0 < 30
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "quant.w.bits" in out and "2..8" in out
    assert "Traceback" not in out
    assert _json_files(results) == []


def test_cli_unknown_preset(qeval_in_process, tmp_path):
    proc = qeval_in_process(["quant=w5z", *TINY, f"results_dir={tmp_path / 'results'}"], tmp_path, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "w5z" in out
    assert _json_files(tmp_path / "results") == []
