"""Write a qeval-quantized model as a compressed-tensors checkpoint that vLLM serves.

The checkpoint carries qeval's *own* integer codes, scales and zero points
(whatever method chose them: RTN, GPTQ, AWQ, OmniQuant; SmoothQuant and
rotations are already folded into the weights and norms), so a real-kernel
evaluation measures the same numbers the fake-quant evaluation did.

The format is compressed-tensors' (the ``compressed-tensors`` library builds
and validates the ``quantization_config`` and packs the int4/int8 codes);
which qeval specs it can express is decided by :func:`export_scheme`, called
before any model is loaded, so an inexpressible cell (W3, W4A4, integer KV,
KIVI, ...) is skipped with the reason instead of failing half-way.

Formats:

* ``dense``: nothing quantized; the float model as an ordinary HF folder;
* ``pack-quantized`` (W4A16 / W8A16): int codes packed into int32, scales per
  group or channel, packed zero points for asymmetric schemes;
* ``int-quantized`` (W8A8 int8): int8 weights with per-channel scales,
  activations quantized by vLLM per token (dynamic) or per tensor (static,
  with qeval's calibrated ``input_scale``);
* ``float-quantized`` (FP8 W8A8): float8_e4m3 weights, per-channel scales,
  dynamic per-token FP8 activations;
* an FP8 ``kv_cache_scheme`` (per-layer ``k_scale``/``v_scale``), alone or with
  any of the above;
* the microscaling formats, as compressed-tensors' own presets define them (their
  ``QuantizationArgs`` are taken from the installed library, so the checkpoint says exactly
  what the library's NVFP4/MXFP4/MXFP8/FP8_BLOCK mean): ``nvfp4-pack-quantized`` (E2M1
  codes two per byte, FP8 block scales, the FP32 ``weight_global_scale`` = 1 / qeval's
  tensor scale; W4A4 adds the calibrated ``input_global_scale``), ``mxfp4-pack-quantized``
  and ``mxfp8-quantized`` (E8M0 scales as biased exponents), and ``float-quantized`` with
  128 x 128 block scales (FP8_BLOCK).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qeval.config import quantized
from qeval.errors import UnsupportedCellError

log = logging.getLogger(__name__)

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
EXPORT_MARKER = "qeval_export.json"


class NotExportableError(UnsupportedCellError):
    """The spec (or the quantized model) has no compressed-tensors form vLLM can load."""


@dataclass(frozen=True)
class ExportScheme:
    """What a spec becomes in compressed-tensors terms."""

    # dense | pack-quantized | int-quantized | float-quantized | nvfp4-pack-quantized |
    # mxfp4-pack-quantized | mxfp8-quantized
    format: str
    weights: dict[str, Any] | None = None
    input_activations: dict[str, Any] | None = None
    kv_cache: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        parts = [self.format]
        if self.kv_cache:
            parts.append("fp8-kv")
        return "+".join(parts)


def _refuse(spec_name: str, why: str) -> NotExportableError:
    return NotExportableError(
        f"quant={spec_name} cannot be exported for vLLM: {why}; it stays a fake-quant-only cell (backend=hf)"
    )


def export_scheme(spec: Any) -> ExportScheme:
    """Map a qeval quant spec to a compressed-tensors scheme, or refuse with the reason.

    Needs no model, so it runs in preflight.
    """
    name = spec.name
    w, a, kv = spec.w, spec.a, spec.kv
    if spec.quantize_embeddings or spec.quantize_lm_head:
        raise _refuse(name, "quantized embeddings or lm_head have no vLLM kernel here")
    kv_args = None
    if quantized(kv):
        if (
            kv.format != "fp8_e4m3"
            or kv.semantics != "fake"
            or kv.key_granularity != "tensor"
            or kv.value_granularity != "tensor"
        ):
            raise _refuse(
                name,
                f"vLLM's quantized KV cache is FP8 e4m3 with one scale per layer "
                f"(quant=kv8-fp8); this spec asks for {kv.format}{kv.bits if kv.format == 'int' else ''} KV "
                f"({kv.key_granularity}/{kv.value_granularity}, semantics={kv.semantics})",
            )
        kv_args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    if not quantized(w):
        return ExportScheme(format="dense", kv_cache=kv_args)
    if w.format in PRESETS_OF_FORMAT:
        return _block_format_scheme(spec, kv_args)
    if not quantized(a):
        if w.format != "int" or w.bits not in (4, 8):
            raise _refuse(name, f"weight-only kernels take int4 or int8 weights, not {w.format}{w.bits}")
        if w.granularity not in ("group", "channel"):
            raise _refuse(name, f"weight-only kernels need per-group or per-channel scales, not {w.granularity}")
        weights = {
            "num_bits": w.bits,
            "type": "int",
            "symmetric": bool(w.sym),
            "strategy": w.granularity,
            "group_size": w.group_size if w.granularity == "group" else None,
        }
        return ExportScheme(format="pack-quantized", weights=weights, kv_cache=kv_args)
    if w.bits != 8 or a.bits != 8 or w.format != a.format:
        raise _refuse(
            name, f"activation kernels are W8A8 (int8 or FP8), not W{w.bits}A{a.bits} ({w.format}/{a.format})"
        )
    if w.granularity != "channel" or not w.sym or not a.sym:
        raise _refuse(name, "W8A8 kernels take symmetric per-channel weights and symmetric activations")
    kind = "int" if w.format == "int" else "float"
    if kind == "float" and (w.format != "fp8_e4m3" or not a.dynamic):
        raise _refuse(name, "FP8 W8A8 is e4m3 with dynamic per-token activations")
    weights = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel"}
    if a.dynamic and a.granularity == "token":
        acts = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token", "dynamic": True}
    elif not a.dynamic and a.granularity == "tensor":
        acts = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "tensor", "dynamic": False}
    else:
        raise _refuse(name, "activations must be dynamic per token or static per tensor")
    return ExportScheme(format=f"{kind}-quantized", weights=weights, input_activations=acts, kv_cache=kv_args)


#: qeval weight format -> (compressed-tensors preset without and with quantized activations,
#: the checkpoint format)
PRESETS_OF_FORMAT = {
    "nvfp4": ("NVFP4A16", "NVFP4", "nvfp4-pack-quantized"),
    "mxfp4": ("MXFP4A16", "MXFP4", "mxfp4-pack-quantized"),
    "mxfp8": ("MXFP8A16", "MXFP8", "mxfp8-quantized"),
    "fp8_block": (None, "FP8_BLOCK", "float-quantized"),
}


def _block_format_scheme(spec: Any, kv_args: dict[str, Any] | None) -> ExportScheme:
    """A microscaling or block-FP8 spec as the compressed-tensors preset of the same name, or
    refused where the installed library has no such preset or qeval's spec differs from it."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    name, w, a = spec.name, spec.w, spec.a
    weight_only, with_acts, fmt = PRESETS_OF_FORMAT[w.format]
    preset_name = with_acts if quantized(a) else weight_only
    if quantized(a) and a.format != w.format:
        raise _refuse(name, f"compressed-tensors' {with_acts} quantizes activations as {w.format} too, not {a.format}")
    if quantized(a) and w.format == "nvfp4" and a.dynamic:
        raise _refuse(
            name,
            "compressed-tensors' NVFP4 activations carry a calibrated tensor scale (input_global_scale); "
            "this spec takes it per call (quant.a.dynamic=true): use quant.a.dynamic=false (quant=w4a4-nvfp4)",
        )
    if preset_name is None:  # FP8_BLOCK weights without FP8 activations: the preset's weights alone
        preset = PRESET_SCHEMES.get(with_acts)
        acts = None
    else:
        preset = PRESET_SCHEMES.get(preset_name)
        acts = preset.get("input_activations") if preset else None
    if preset is None:
        raise _refuse(name, f"the installed compressed-tensors has no {preset_name or with_acts} preset (upgrade it)")
    weights = preset["weights"].model_dump()
    inputs = acts.model_dump() if acts is not None else None
    return ExportScheme(format=fmt, weights=weights, input_activations=inputs, kv_cache=kv_args)


def quantization_config(scheme: ExportScheme, ignore: list[str]) -> dict[str, Any] | None:
    """The ``quantization_config`` block of config.json, built and validated by compressed-tensors."""
    if scheme.format == "dense" and not scheme.kv_cache:
        return None
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    if scheme.weights:
        groups["group_0"] = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(**scheme.weights),
            input_activations=QuantizationArgs(**scheme.input_activations) if scheme.input_activations else None,
            format=scheme.format,
        )
    qc = QuantizationConfig(
        config_groups=groups,
        format=scheme.format if scheme.weights else "dense",
        quantization_status="compressed",
        ignore=ignore,
        kv_cache_scheme=QuantizationArgs(**scheme.kv_cache) if scheme.kv_cache else None,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(mode="json", exclude={"quant_method"}),
    }


def _linear_tensors(name: str, module: nn.Module, scheme: ExportScheme) -> dict[str, torch.Tensor]:
    """The compressed tensors of one quantized linear, from its kept codes and scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qt = module.qweight
    if qt is None:
        raise NotExportableError(
            f"{name} has no per-group codes (GPTQ with act_order and without "
            "static_groups mixes groups); use method.params.static_groups=true to export"
        )
    if getattr(module, "input_transform", None) is not None:
        raise NotExportableError(
            f"{name} rotates its input online (QuaRot's Hadamard before down_proj), "
            "which vLLM's compressed-tensors loader cannot express"
        )
    out_features, in_features = qt.q.shape
    if qt.block_rows > 1 and (out_features % qt.block_rows or in_features % qt.group_size):
        raise NotExportableError(
            f"{name} is {out_features} x {in_features}, not whole {qt.block_rows} x {qt.group_size} tiles; "
            "block-FP8 checkpoints (and vLLM's block kernels) need both dimensions divisible by the tile"
        )
    if in_features % qt.group_size and qt.block_rows == 1:
        raise NotExportableError(
            f"{name} has {in_features} input features, not a multiple of group_size="
            f"{qt.group_size}; compressed-tensors groups must divide the row "
            f"(choose a group size dividing {in_features})"
        )
    if scheme.format in BLOCK_FORMATS:
        return _block_format_tensors(module, scheme)
    if qt.block_rows > 1:  # FP8_BLOCK: one scale per tile, [row blocks, column blocks]
        scale = qt.scale.float().contiguous()
    else:
        scale = qt.scale.float().reshape(out_features, -1).contiguous()
    if scheme.format == "pack-quantized":
        bits = qt.fmt.bits
        offset = 0 if qt.fmt.sym else 1 << (bits - 1)  # compressed-tensors stores signed codes
        tensors = {
            "weight_packed": pack_to_int32((qt.q - offset).to(torch.int8), bits).contiguous(),
            "weight_scale": scale,
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not qt.fmt.sym:
            zero = qt.zero.reshape(out_features, -1)
            tensors["weight_zero_point"] = pack_to_int32(
                (zero - offset).to(torch.int8), bits, packed_dim=0
            ).contiguous()
        return tensors
    codes = qt.q.to(torch.int8) if scheme.format == "int-quantized" else qt.q.to(torch.float8_e4m3fn)
    tensors = {"weight": codes.contiguous(), "weight_scale": scale}
    aq = module.input_quantizer
    if scheme.input_activations and not scheme.input_activations["dynamic"]:
        tensors["input_scale"] = aq.scale.float().reshape(1).clone()
    return tensors


BLOCK_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized")


def _block_format_tensors(module: nn.Module, scheme: ExportScheme) -> dict[str, torch.Tensor]:
    """A microscaling linear's tensors: its E2M1 codes packed by compressed-tensors' own packer
    (or its E4M3 codes), its block scales in the format's scale type."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    qt = module.qweight
    out_features, in_features = qt.q.shape
    scale = qt.scale.float().reshape(out_features, -1)
    if scheme.format == "mxfp8-quantized":
        tensors = {"weight": qt.q.to(torch.float8_e4m3fn).contiguous()}
    else:
        tensors = {"weight_packed": pack_fp4_to_uint8(qt.q.float()).contiguous()}
    if scheme.format == "nvfp4-pack-quantized":
        tensors["weight_scale"] = scale.to(torch.float8_e4m3fn).contiguous()
        tensors["weight_global_scale"] = (1 / qt.tensor_scale.float()).reshape(1)
        aq = module.input_quantizer
        if scheme.input_activations is not None:
            tensors["input_global_scale"] = (1 / aq.scale.float()).reshape(1).clone()
    else:
        tensors["weight_scale"] = compress_mx_scale(scale, torch.uint8).contiguous()
    return tensors


@torch.no_grad()
def kv_scales(model: nn.Module, batches: Iterable[torch.Tensor], attention_paths: list[str]) -> dict[str, torch.Tensor]:
    """Static per-layer FP8 scales for the KV cache (amax / 448), from calibration data.

    Observed where vLLM quantizes: the states handed to the cache, i.e. after
    rotary embedding and any q/k norm.  ``attention_paths[i]`` is the module that
    owns layer ``i``'s ``k_scale``/``v_scale``.
    """
    from qeval.quant.kv import observe_cached_states

    amax: dict[str, torch.Tensor] = {}

    def record(key: str, x: torch.Tensor) -> None:
        m = x.detach().float().abs().amax()
        amax[key] = torch.maximum(amax[key], m) if key in amax else m

    def observe(layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        record(f"{attention_paths[layer_idx]}.k_scale", keys)
        record(f"{attention_paths[layer_idx]}.v_scale", values)

    observe_cached_states(model, batches, observe)
    return {k: (v / FP8_MAX).clamp(min=1e-8).reshape(1) for k, v in amax.items()}


def compressed_state_dict(model: nn.Module, scheme: ExportScheme) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's tensors and the names of linears left in full precision (``ignore``)."""
    from qeval.quant.linear import QuantLinear

    state = {
        k: v
        for k, v in model.state_dict().items()
        if ".input_quantizer." not in k and not k.endswith(".input_transform")
    }
    ignore = []
    quantized_linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and scheme.weights:
            ignore.append(name)  # "Linear" targets would otherwise claim it
    for name, module in quantized_linears.items():
        if not scheme.weights:
            raise NotExportableError(f"{name} is quantized but the scheme has no weight format")
        del state[f"{name}.weight"]
        for key, tensor in _linear_tensors(name, module, scheme).items():
            state[f"{name}.{key}"] = tensor
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():  # tied: stored once
        head_name = next(n for n, m in model.named_modules() if m is head)
        state.pop(f"{head_name}.weight", None)
    return state, ignore


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    spec: Any,
    out_dir: str | Path,
    kv_calibration: Iterable[torch.Tensor] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (already quantized by qeval) as a compressed-tensors checkpoint.

    The folder is written next to its final place and renamed when complete, so an
    interrupted export never leaves a half checkpoint that a later run would load.
    """
    from safetensors.torch import save_file

    from qeval.models.adapters import get_adapter

    scheme = export_scheme(spec)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state, ignore = compressed_state_dict(model, scheme)
    if scheme.kv_cache:
        if kv_calibration is None:
            raise ValueError("an FP8 KV-cache export needs calibration batches for its static scales")
        adapter = get_adapter(model, "FP8 KV-cache export")
        paths = [f"{adapter.blocks}.{i}.{adapter.attention}" for i in range(len(adapter.get_blocks(model)))]
        state.update(kv_scales(model, kv_calibration, paths))
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = config["dtype"] = "float32"
    qc = quantization_config(scheme, ignore)
    if qc is not None:
        config["quantization_config"] = qc
    else:
        config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:  # a random-weight timing model has none
        tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_MARKER).write_text(
        json.dumps({"scheme": scheme.label, "quant": spec.name, **(provenance or {})}, indent=2, default=str)
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("exported %s checkpoint to %s", scheme.label, out_dir)
    return out_dir


def is_complete_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MARKER).is_file()


def dequantized_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read an exported checkpoint back into float weights, through compressed-tensors' own
    decompressors (what a loader sees); used by tests to check the export is exact."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    config = json.loads((checkpoint / "config.json").read_text())
    if "quantization_config" not in config or not config["quantization_config"]["config_groups"]:
        return {k: v for k, v in tensors.items() if k.endswith(".weight")}
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    out = {}
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    for prefix in prefixes:
        local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}
        if scheme.weights is not None and scheme.weights.strategy == "block":
            # the library's float decompressor infers the strategy from the scale's shape, which
            # is ambiguous for one tile column ([2, 1] reads as per channel): pass the arguments
            from compressed_tensors.quantization.lifecycle.forward import dequantize

            out[f"{prefix}.weight"] = dequantize(local["weight"], local["weight_scale"], args=scheme.weights).float()
            continue
        out[f"{prefix}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    for key, value in tensors.items():
        if key.endswith(".weight") and key.rsplit(".", 1)[0] not in prefixes:
            out[key] = value
    return out
