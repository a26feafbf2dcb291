"""On-disk cache of fake-quantized models, so that a sweep re-run with new tasks does not
re-run slow methods (GPTQ, OmniQuant, AWQ) on the same model, spec and calibration.

One cache entry is a folder with ``model.safetensors`` (every tensor the quantized model
holds: the dequantized weights, norms a method rescaled or rotated, QuaRot's online
transforms, plus each linear's integer codes and scales and each static activation
quantizer's scale, which are plain attributes rather than state-dict entries) and
``manifest.json`` (which linears are quantized, in which format, and the few structural
facts a state dict cannot carry: an untied head, a bias a method added).  Weights are
read back with safetensors only: no pickle.

The structure is rebuilt on a fresh copy of the unquantized model (untie, wrap the
listed linears in :class:`QuantLinear`, install the KV quantizer from the spec) and the
tensors are loaded strictly, so an entry that does not fit the model is a miss, never a
silently wrong model.  Entries are written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qeval.config import quantized
from qeval.quant.coverage import EXPERT_FALLBACKS_ATTR, QUANTIZED_PARAMS_ATTR
from qeval.quant.experts import EXPERT_INPUTS_ATTR, quantize_expert_inputs
from qeval.quant.formats import QuantFormat, QuantizedTensor
from qeval.quant.kv import install_kv_for_spec
from qeval.quant.linear import ActivationQuantizer, QuantLinear, replace_module
from qeval.quant.transforms import untie_output_embeddings
from qeval.quant.typing_helpers import input_embeddings, output_embeddings

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
EXTRA = "__qeval__."  # prefix of tensors that are not in the model's state dict
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def _fmt(fmt: QuantFormat) -> dict[str, Any]:
    return {"bits": fmt.bits, "kind": fmt.kind, "sym": fmt.sym}


def _save_input_quantizer(aq: ActivationQuantizer, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    info = {"fmt": _fmt(aq.fmt), "granularity": aq.granularity, "dynamic": aq.dynamic, "zero": aq.zero is not None}
    if not aq.dynamic:
        if aq.scale is None:
            raise RuntimeError(f"{key}: static activation quantizer saved before freeze()")
        tensors[f"{EXTRA}{key}.act_scale"] = aq.scale.detach().cpu().reshape(-1).contiguous()
        if aq.zero is not None:
            tensors[f"{EXTRA}{key}.act_zero"] = aq.zero.detach().cpu().reshape(-1).contiguous()
    return info


def _load_input_quantizer(
    a: dict[str, Any], key: str, tensors: dict[str, torch.Tensor], device: torch.device
) -> ActivationQuantizer:
    aq = ActivationQuantizer(QuantFormat(**a["fmt"]), a["granularity"], a["dynamic"]).to(device)
    if not a["dynamic"]:
        aq.scale = tensors[f"{EXTRA}{key}.act_scale"].reshape(())
        aq.zero = tensors[f"{EXTRA}{key}.act_zero"].reshape(()) if a["zero"] else None
        aq.observing = False
    return aq


def save_quantized(model: nn.Module, directory: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the quantized ``model`` (the output of ``quantize_model``) to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # state-dict key -> the key holding the same storage (tied weights)
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), tuple(value.shape))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().cpu().contiguous()
    linears: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        info: dict[str, Any] = {"bias": module.bias is not None, "qweight": None, "input_quantizer": None}
        if (qt := module.qweight) is not None:
            info["qweight"] = {
                "group_size": qt.group_size,
                "fmt": _fmt(qt.fmt),
                "zero": qt.zero is not None,
                "block_rows": qt.block_rows,
                "tensor_scale": qt.tensor_scale is not None,
            }
            tensors[f"{EXTRA}{name}.q"] = qt.q.detach().cpu().contiguous()
            tensors[f"{EXTRA}{name}.scale"] = qt.scale.detach().cpu().contiguous()
            if qt.tensor_scale is not None:
                tensors[f"{EXTRA}{name}.tensor_scale"] = qt.tensor_scale.detach().cpu().reshape(1).contiguous()
            if qt.zero is not None:
                tensors[f"{EXTRA}{name}.zero"] = qt.zero.detach().cpu().contiguous()
        if (aq := module.input_quantizer) is not None:
            info["input_quantizer"] = _save_input_quantizer(aq, name, tensors)
        linears[name] = info
    head, emb = output_embeddings(model), input_embeddings(model)
    # fused MoE expert tensors quantized in place: their marks (the coverage account reads them)
    experts = {
        name: dict(marks)
        for name, module in model.named_modules()
        if (marks := getattr(module, QUANTIZED_PARAMS_ATTR, None))
    }
    # and the quantizers of their matmuls' inputs (WA specs), with static scales where frozen
    expert_inputs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        for tensor_name, aq in (getattr(module, EXPERT_INPUTS_ATTR, None) or {}).items():
            key = f"{name}/{tensor_name}"
            expert_inputs.setdefault(name, {})[tensor_name] = _save_input_quantizer(aq, key, tensors)
    manifest = {
        "format": CACHE_FORMAT,
        "linears": linears,
        "experts": experts,
        "expert_fallbacks": {
            name: dict(f)
            for name, module in model.named_modules()
            if (f := getattr(module, EXPERT_FALLBACKS_ATTR, None))
        },
        "expert_inputs": expert_inputs,
        "aliases": aliases,
        "untied_head": head is not None
        and head.weight is not emb.weight
        and bool(getattr(model.config, "tie_word_embeddings", False)),
        "provenance": provenance or {},
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": str(CACHE_FORMAT)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.replace(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_quantized(model: nn.Module, directory: str | Path, spec: Any) -> bool:
    """Turn ``model``, a fresh copy of the unquantized model, into the cached quantized model.

    Returns False when there is no usable entry (none, another format, damaged, or
    not fitting this model: reported, never raised).  After False the copy may be
    partly rebuilt: quantize a new fresh copy instead.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    device = next(model.parameters()).device
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        tensors = load_file(str(directory / WEIGHTS), device=str(device))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, SafetensorError) as err:
        log.warning("quantized-model cache entry %s is unreadable (%s); quantizing again", directory, err)
        return False
    try:
        _rebuild(model, manifest, tensors, spec)
    except (KeyError, RuntimeError, ValueError, AttributeError) as err:
        log.warning("quantized-model cache entry %s does not fit the model (%s); quantizing again", directory, err)
        return False
    return True


def _rebuild(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: Any) -> None:
    if manifest["untied_head"]:
        untie_output_embeddings(model)
    for name, info in manifest["linears"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a linear layer")
        if info["bias"] and linear.bias is None:  # a method folded a shift into a new bias (OmniQuant LET)
            linear.bias = nn.Parameter(
                torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device),
                requires_grad=False,
            )
        qt = None
        if (q := info["qweight"]) is not None:
            qt = QuantizedTensor(
                tensors[f"{EXTRA}{name}.q"],
                tensors[f"{EXTRA}{name}.scale"],
                tensors[f"{EXTRA}{name}.zero"] if q["zero"] else None,
                q["group_size"],
                QuantFormat(**q["fmt"]),
                tensors[f"{EXTRA}{name}.tensor_scale"].reshape(()) if q.get("tensor_scale") else None,
                q.get("block_rows", 1),
            )
        aq = None
        if (a := info["input_quantizer"]) is not None:
            aq = _load_input_quantizer(a, name, tensors, linear.weight.device)
        transform = tensors.get(f"{name}.input_transform")
        replace_module(model, name, QuantLinear(linear, tensors[f"{name}.weight"], qt, aq, transform))
    for name, inputs in manifest.get("expert_inputs", {}).items():
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        quantize_expert_inputs(
            module, {t: _load_input_quantizer(a, f"{name}/{t}", tensors, device) for t, a in inputs.items()}
        )
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}
    for key, source in manifest["aliases"].items():
        state[key] = state[source]
    model.load_state_dict(state, strict=True)
    for name, marks in manifest.get("experts", {}).items():
        setattr(model.get_submodule(name), QUANTIZED_PARAMS_ATTR, dict(marks))
    for name, fallbacks in manifest.get("expert_fallbacks", {}).items():
        setattr(model.get_submodule(name), EXPERT_FALLBACKS_ATTR, dict(fallbacks))
    if quantized(spec.kv):
        install_kv_for_spec(model, spec.kv)
