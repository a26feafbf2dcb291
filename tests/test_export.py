"""compressed-tensors export: the written checkpoint decodes back to qeval's own weights,
its config says what vLLM needs, and inexpressible specs are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors", reason="compressed-tensors is installed with vllm (pip install qeval[vllm])")

from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec  # noqa: E402
from qeval.errors import UnsupportedCellError  # noqa: E402
from qeval.export.compressed_tensors import (  # noqa: E402
    NotExportableError,
    dequantized_weights,
    export_checkpoint,
    export_scheme,
)
from qeval.models.tiny import build_tiny_model, byte_tokenizer  # noqa: E402
from qeval.quant.apply import quantize_model  # noqa: E402
from qeval.quant.linear import QuantLinear  # noqa: E402
from qeval.quant.recipe import get_method  # noqa: E402


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (2, 24), generator=g) for _ in range(2)]


def _export(tmp_path, spec, family="llama", method="rtn", params=None):
    model = build_tiny_model(family)
    quantize_model(model, spec, get_method(method, params or {}), _calib)
    path = export_checkpoint(model, byte_tokenizer(), spec, tmp_path / "ckpt", kv_calibration=_calib())
    return model, path


def _assert_decodes_exactly(model, path):
    decoded = dequantized_weights(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert linears
    for name, module in linears.items():
        torch.testing.assert_close(decoded[f"{name}.weight"], module.weight.float(), rtol=0, atol=0)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,granularity", [(4, "group"), (4, "channel"), (8, "group")])
def test_w4a16_w8a16_pack_quantized_decodes_to_qeval_weights(tmp_path, bits, granularity, sym):
    spec = QuantSpec(name="w", w=WeightSpec(bits=bits, granularity=granularity, group_size=16, sym=sym))
    model, path = _export(tmp_path, spec)
    _assert_decodes_exactly(model, path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    args = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert (args["num_bits"], args["strategy"], args["symmetric"]) == (bits, granularity, sym)
    assert args["group_size"] == (16 if granularity == "group" else None)
    assert qc["ignore"] == ["lm_head"]  # the head stays float and "Linear" must not claim it
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (64, 160 * bits // 32)
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in tensors) == (not sym)
    assert "lm_head.weight" not in tensors  # tied to the embedding: stored once


def test_gptq_and_awq_codes_export_exactly(tmp_path):
    spec = QuantSpec(name="w4g16", w=WeightSpec(bits=4, granularity="group", group_size=16, sym=False))
    for method in ("gptq", "awq"):
        model, path = _export(tmp_path / method, spec, method=method)
        _assert_decodes_exactly(model, path)


def test_w8a8_int_and_fp8_keep_codes_and_scales(tmp_path):
    from safetensors.torch import load_file

    spec = QuantSpec(
        name="w8a8",
        w=WeightSpec(bits=8, granularity="channel", sym=True),
        a=ActivationSpec(bits=8, granularity="token", dynamic=True, sym=True),
    )
    model, path = _export(tmp_path / "int", spec, family="qwen2", method="smoothquant")
    _assert_decodes_exactly(model, path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert qc["format"] == "int-quantized" and acts["strategy"] == "token" and acts["dynamic"] is True
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
    # SmoothQuant's scales live in the norms: the exported norm is the smoothed one
    torch.testing.assert_close(
        tensors["model.layers.0.input_layernorm.weight"], model.model.layers[0].input_layernorm.weight.detach()
    )

    fp8 = QuantSpec(
        name="w8a8-fp8",
        w=WeightSpec(bits=8, format="fp8_e4m3", granularity="channel", sym=True),
        a=ActivationSpec(bits=8, format="fp8_e4m3", granularity="token", dynamic=True, sym=True),
    )
    model, path = _export(tmp_path / "fp8", fp8)
    _assert_decodes_exactly(model, path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"


def test_static_activation_scale_is_written(tmp_path):
    from safetensors.torch import load_file

    spec = QuantSpec(
        name="w8a8-static",
        w=WeightSpec(bits=8, granularity="channel", sym=True),
        a=ActivationSpec(bits=8, granularity="tensor", dynamic=False, sym=True),
    )
    model, path = _export(tmp_path, spec)
    tensors = load_file(str(path / "model.safetensors"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert tensors["model.layers.0.self_attn.q_proj.input_scale"].item() == pytest.approx(
        q_proj.input_quantizer.scale.item(), rel=0, abs=0
    )


def test_fp8_kv_scales_bound_the_cached_states(tmp_path):
    from safetensors.torch import load_file

    spec = QuantSpec(
        name="kv8-fp8",
        kv=KVSpec(bits=8, format="fp8_e4m3", sym=True, key_granularity="tensor", value_granularity="tensor"),
    )
    model, path = _export(tmp_path, spec, family="gemma3")  # q/k norms: scales must see the cached keys
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["strategy"] == "tensor"
    assert qc["config_groups"] == {}
    tensors = load_file(str(path / "model.safetensors"))
    k0 = tensors["model.layers.0.self_attn.k_scale"]
    assert k0.shape == (1,) and k0.item() > 0
    # the largest cached key/value of the calibration data maps onto FP8's largest value (448)
    from transformers import DynamicCache

    fp_model = build_tiny_model("gemma3")
    k_max = v_max = 0.0
    with torch.no_grad():
        for batch in _calib():
            cache = DynamicCache(config=fp_model.config)
            fp_model(batch, past_key_values=cache, use_cache=True)
            k_max = max(k_max, cache.layers[0].keys.abs().max().item())
            v_max = max(v_max, cache.layers[0].values.abs().max().item())
    assert k0.item() * 448 == pytest.approx(k_max, rel=1e-5)
    assert tensors["model.layers.0.self_attn.v_scale"].item() * 448 == pytest.approx(v_max, rel=1e-5)


@pytest.mark.parametrize(
    "spec,needle",
    [
        (QuantSpec(name="w3g128", w=WeightSpec(bits=3)), "int4 or int8"),
        (
            QuantSpec(name="w4a4", w=WeightSpec(bits=4, granularity="channel", sym=True), a=ActivationSpec(bits=4)),
            "W4A4",
        ),
        (QuantSpec(name="kv4", kv=KVSpec(bits=4)), "int4 KV"),
        (
            QuantSpec(
                name="kivi",
                kv=KVSpec(
                    bits=8, format="fp8_e4m3", semantics="cache", key_granularity="tensor", value_granularity="tensor"
                ),
            ),
            "semantics=cache",
        ),
        (QuantSpec(name="w8t", w=WeightSpec(bits=8, granularity="tensor")), "per-group or per-channel"),
    ],
)
def test_inexpressible_specs_are_refused_with_the_reason(spec, needle):
    with pytest.raises(NotExportableError, match=f"quant={spec.name} cannot be exported.*{needle}"):
        export_scheme(spec)


def test_online_hadamard_and_ragged_groups_are_refused(tmp_path):
    spec = QuantSpec(
        name="w8a8",
        w=WeightSpec(bits=8, granularity="channel", sym=True),
        a=ActivationSpec(bits=8, granularity="token", dynamic=True, sym=True),
    )
    with pytest.raises(NotExportableError, match="online"):
        _export(tmp_path / "rot", spec, method="quarot")
    ragged = QuantSpec(name="w4g48", w=WeightSpec(bits=4, granularity="group", group_size=48))
    with pytest.raises(NotExportableError, match="not a multiple of group_size=48"):
        _export(tmp_path / "ragged", ragged)


def test_efficiency_memory_accounting(tmp_path):
    """Weight bytes are the checkpoint's tensors (W4 packs 8 codes per int32); KV bytes per
    token follow the model shape and cache dtype."""
    from safetensors.torch import load_file

    from qeval.backends.efficiency import checkpoint_weight_bytes, kv_bytes_per_token

    dense_spec = QuantSpec(name="fp16")
    w4_spec = QuantSpec(name="w4", w=WeightSpec(bits=4, granularity="group", group_size=16, sym=True))
    _, dense = _export(tmp_path / "dense", dense_spec)
    _, w4 = _export(tmp_path / "w4", w4_spec)
    for path in (dense, w4):
        tensors = load_file(str(path / "model.safetensors"))
        assert checkpoint_weight_bytes(path) == sum(t.numel() * t.element_size() for t in tensors.values())
    # every linear's float32 weight (4 bytes/value) became 0.5 byte/value plus one fp32 scale per 16
    linears = [
        m for n, m in build_tiny_model("llama").named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    values = sum(m.weight.numel() for m in linears)
    saved = checkpoint_weight_bytes(dense) - checkpoint_weight_bytes(w4)
    shapes = len(linears) * 2 * 8  # each linear also stores its weight_shape: two int64
    assert saved == values * 4 - values // 2 - values // 16 * 4 - shapes
    config = json.loads((dense / "config.json").read_text())  # 2 layers, 2 KV heads of 16
    assert kv_bytes_per_token(config, "auto", "float32") == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(config, "fp8_e4m3", "float32") == 2 * 2 * 2 * 16


def test_engine_runs_16bit_activations_where_the_cpu_kernel_needs_them():
    """vLLM's CPU W4A16 kernel needs 16-bit activations everywhere; its W8A8 int8 kernel only on
    AMX CPUs (the AMX kernel rejects float32 inputs); everything else runs float32."""
    from qeval.backends.vllm import EngineSettings, cpu_kernel_needs_16bit

    w4a16 = export_scheme(QuantSpec(name="w4g128", w=WeightSpec(bits=4)))
    w8a8 = export_scheme(
        QuantSpec(
            name="w8a8",
            w=WeightSpec(bits=8, granularity="channel", sym=True),
            a=ActivationSpec(bits=8, granularity="token", dynamic=True, sym=True),
        )
    )
    w8a16 = export_scheme(QuantSpec(name="w8", w=WeightSpec(bits=8, granularity="channel", sym=True)))
    avx512, amx = {"avx2", "avx512f"}, {"avx2", "avx512f", "amx_tile", "amx_int8"}
    assert cpu_kernel_needs_16bit(w4a16, avx512) and cpu_kernel_needs_16bit(w4a16, amx)
    assert not cpu_kernel_needs_16bit(w8a8, avx512) and cpu_kernel_needs_16bit(w8a8, amx)
    assert cpu_kernel_needs_16bit(w8a16, avx512) == (w8a16.format == "pack-quantized")
    assert not cpu_kernel_needs_16bit(None, amx)
    # an explicit dtype wins over the derived one, on any CPU
    assert EngineSettings(dtype="float32", scheme=w8a8).llm_kwargs("cpu")["dtype"] == "float32"
    assert EngineSettings(scheme=None).llm_kwargs("cpu")["dtype"] == "float32"


# ---------------------------------------------------------------------------- microscaling formats

MICRO_SPECS = {
    "w4a16-nvfp4": QuantSpec("w4a16-nvfp4", w=WeightSpec(4, "nvfp4", "group", 16, True)),
    "w4a4-nvfp4": QuantSpec(
        "w4a4-nvfp4",
        w=WeightSpec(4, "nvfp4", "group", 16, True),
        a=ActivationSpec(4, "nvfp4", "token", dynamic=False, sym=True),
    ),
    "w4a16-mxfp4": QuantSpec("w4a16-mxfp4", w=WeightSpec(4, "mxfp4", "group", 32, True)),
    "w4a4-mxfp4": QuantSpec(
        "w4a4-mxfp4", w=WeightSpec(4, "mxfp4", "group", 32, True), a=ActivationSpec(4, "mxfp4", "token")
    ),
    "w8a8-mxfp8": QuantSpec(
        "w8a8-mxfp8", w=WeightSpec(8, "mxfp8", "group", 32, True), a=ActivationSpec(8, "mxfp8", "token")
    ),
    "w8a8-fp8-block": QuantSpec(
        "w8a8-fp8-block", w=WeightSpec(8, "fp8_block", "block", 128, True), a=ActivationSpec(8, "fp8_block", "token")
    ),
}
CT_FORMATS = {
    "w4a16-nvfp4": ("nvfp4-pack-quantized", "NVFP4A16"),
    "w4a4-nvfp4": ("nvfp4-pack-quantized", "NVFP4"),
    "w4a16-mxfp4": ("mxfp4-pack-quantized", "MXFP4A16"),
    "w4a4-mxfp4": ("mxfp4-pack-quantized", "MXFP4"),
    "w8a8-mxfp8": ("mxfp8-quantized", "MXFP8"),
    "w8a8-fp8-block": ("float-quantized", "FP8_BLOCK"),
}


def _tile_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=264,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_block_fp8_of_partial_tiles_is_refused(tmp_path):
    with pytest.raises(NotExportableError, match="not whole 128 x 128 tiles"):
        _export(tmp_path, MICRO_SPECS["w8a8-fp8-block"])


@pytest.mark.parametrize("name", sorted(MICRO_SPECS))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_microscaling_checkpoints_decode_to_qeval_weights(tmp_path, name, method):
    """compressed-tensors' own decompressor reads qeval's codes and scales back to exactly the
    weights qeval evaluated, and the config's arguments are the library's preset."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from safetensors.torch import load_file

    spec = MICRO_SPECS[name]
    if name == "w8a8-fp8-block":  # whole 128 x 128 tiles: a llama of width 128
        model = _tile_llama()
        quantize_model(model, spec, get_method(method), _calib)
        path = export_checkpoint(model, byte_tokenizer(), spec, tmp_path / "ckpt")
    else:
        model, path = _export(tmp_path, spec, method=method)
    decoded = dequantized_weights(path)
    tensors = load_file(str(path / "model.safetensors"))
    for lin_name, module in ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)):
        if "nvfp4" not in name:  # E2M1/E4M3 codes times powers of two (or FP32 tiles): exact
            torch.testing.assert_close(decoded[f"{lin_name}.weight"], module.weight.float(), rtol=1e-6, atol=0)
            continue
        # the library decodes NVFP4 in bfloat16 (block scale / global scale is not a power of
        # two): equal to qeval's weights up to bfloat16 rounding; the stored codes and
        # scales are qeval's exactly
        torch.testing.assert_close(decoded[f"{lin_name}.weight"], module.weight.float(), rtol=2**-8, atol=0)
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

        qt = module.qweight
        packed = tensors[f"{lin_name}.weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        assert torch.equal(codes, qt.q.float())
        assert torch.equal(tensors[f"{lin_name}.weight_scale"].float(), qt.scale.float())
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt, preset = CT_FORMATS[name]
    assert raw["format"] == fmt
    qc = QuantizationConfig.model_validate(raw)  # the library accepts what it reads back
    group = qc.config_groups["group_0"]
    keys = ("num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "scale_dtype")
    same = lambda a, b: {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}  # noqa: E731
    assert same(group.weights, PRESET_SCHEMES[preset]["weights"])
    acts = PRESET_SCHEMES[preset].get("input_activations")
    assert (group.input_activations is None) == (acts is None) and (acts is None or same(group.input_activations, acts))
    first = "model.layers.0.self_attn.q_proj"
    if "nvfp4" in name:
        assert tensors[f"{first}.weight_scale"].dtype == torch.float8_e4m3fn
        ts = model.get_submodule(first).qweight.tensor_scale
        assert tensors[f"{first}.weight_global_scale"].item() == pytest.approx(1 / ts.item())
        if name == "w4a4-nvfp4":  # the calibrated activation tensor scale, as compressed-tensors stores it
            aq = model.get_submodule(first).input_quantizer
            assert tensors[f"{first}.input_global_scale"].item() == pytest.approx(1 / aq.scale.item())
    elif "mx" in name:
        assert tensors[f"{first}.weight_scale"].dtype == torch.uint8  # E8M0: biased exponents
    else:
        out_features, in_features = model.get_submodule(first).weight.shape
        assert tensors[f"{first}.weight_scale"].shape == (-(-out_features // 128), -(-in_features // 128))


def test_nvfp4_with_per_call_activation_tensor_scale_is_refused():
    spec = QuantSpec(
        "w4a4-nvfp4-dyn", w=WeightSpec(4, "nvfp4", "group", 16, True), a=ActivationSpec(4, "nvfp4", "token")
    )
    with pytest.raises(NotExportableError, match="input_global_scale.*quant.a.dynamic=false"):
        export_scheme(spec)
    with pytest.raises(NotExportableError, match="asks for nvfp4 KV"):  # an NVFP4 KV cache: FP8 only here
        export_scheme(QuantSpec("kv4-nvfp4", kv=KVSpec(4, "nvfp4", sym=True)))


def test_microscaling_kernels_vllm_cpu_lacks_are_refused_by_name():
    """vLLM 0.32's CPU build has no NVFP4/MXFP4/MXFP8 linear kernel (measured: it fails at load);
    those cells skip naming it, on a GPU they run; block FP8 runs on the CPU in bfloat16."""
    from qeval.backends.vllm import check_kernels, cpu_kernel_needs_16bit

    for name, needle in (("w4a16-nvfp4", "NVFP4 GEMM"), ("w4a4-mxfp4", "MXFP4 linear"), ("w8a8-mxfp8", "MXFP8")):
        scheme = export_scheme(MICRO_SPECS[name])
        with pytest.raises(UnsupportedCellError, match=f"{needle}.*lacks: run this cell on a GPU"):
            check_kernels(scheme, "cpu")
        check_kernels(scheme, "cuda")
    block = export_scheme(MICRO_SPECS["w8a8-fp8-block"])
    check_kernels(block, "cpu")
    assert cpu_kernel_needs_16bit(block, {"avx2"})


def test_block_fp8_on_vllm_checks_the_models_shapes_before_loading():
    from transformers import LlamaConfig

    from qeval.backends.vllm import VllmBackend

    backend = VllmBackend.__new__(VllmBackend)
    ragged = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(UnsupportedCellError, match="whole 128 x 128 tiles; this model has .*576"):
        backend.check_model(MICRO_SPECS["w8a8-fp8-block"], ragged)
    whole = LlamaConfig(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
    backend.check_model(MICRO_SPECS["w8a8-fp8-block"], whole)  # Qwen2.5-0.5B's widths: whole tiles
    backend.check_model(MICRO_SPECS["w4a16-nvfp4"], ragged)  # other formats: no tile rule
