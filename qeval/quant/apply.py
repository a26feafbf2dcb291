"""Apply a quantization spec and a method to an in-memory model.

The order is fixed: the method decides the weights (it may transform the
model first), linears become :class:`QuantLinear` with activation quantizers
where the spec asks for them, static activation scales are observed on
calibration data, and finally the KV-cache quantizer is installed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qeval.config import QuantSpec, quantized, tensor_type
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import ADAPTERS
from qeval.placement import current_placement, streamed
from qeval.quant.coverage import INPUT_NOT_CALLED_ATTR, QUANTIZED_PARAMS_ATTR
from qeval.quant.experts import (
    FusedExperts,
    find_fused_experts,
    quantize_expert_inputs,
    quantize_experts,
    routers,
)
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.kv import install_kv_for_spec, kv_layers_or_refuse
from qeval.quant.linear import ActivationQuantizer, QuantLinear, replace_module
from qeval.quant.methods import Step
from qeval.quant.methods.quarot import INPUT_TRANSFORM_ATTR
from qeval.quant.recipe import Recipe
from qeval.quant.transforms import untie_output_embeddings
from qeval.quant.typing_helpers import input_embeddings, output_embeddings, weight_of

log = logging.getLogger(__name__)


def target_linears(model: nn.Module, quantize_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model except the output projection (unless asked) and the
    MoE routers (which stay in full precision, and some of which subclass ``nn.Linear`` but
    return more than one tensor: Llama 4's).

    Architecture-agnostic on purpose: the output embedding is found through
    ``get_output_embeddings()`` and routers by structure (qeval.quant.experts), not by name.
    """
    head = output_embeddings(model) if hasattr(model, "get_output_embeddings") else None
    skip = set(routers(model))
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (quantize_lm_head or module is not head) and name not in skip
    }


def _handles_experts(recipe: Recipe, spec: QuantSpec) -> bool:
    return not any(step.why_not_experts(spec) for step in recipe.steps)


def _experts_refusal(recipe: Recipe, spec: QuantSpec, where: str) -> UnsupportedCellError:
    reasons = [why for step in recipe.steps if (why := step.why_not_experts(spec))]
    return UnsupportedCellError(
        f"method {recipe.name!r} on fused MoE experts ({where}), most of the weights: {'; '.join(reasons)}"
    )


def refuse_unsupported_experts(
    model: nn.Module, spec: QuantSpec, recipe: Recipe, fused: list[FusedExperts] | None = None
) -> None:
    """UnsupportedCellError (the cell is skipped, saying why) for what qeval cannot yet do on
    fused MoE experts, before any weight is touched."""
    fused = find_fused_experts(model) if fused is None else fused
    if not fused or not quantized(spec.w):
        return
    where = f"{fused[0].path} and {len(fused) - 1} more MoE blocks" if len(fused) > 1 else fused[0].path
    if not _handles_experts(recipe, spec):
        raise _experts_refusal(recipe, spec, where)


def refuse_for_architecture(recipe: Recipe, spec: QuantSpec, config: Any) -> None:
    """Before any weight loads: refuse (UnsupportedCellError) what the model's config already
    shows cannot run: a step whose family has no adapter entry or cannot be rotated, a recipe
    that cannot quantize the fused experts of an MoE family in the adapter table.  The same
    conditions are checked again on the loaded model; this only saves the load."""
    if not quantized(spec.w):
        return
    model_type = getattr(config, "model_type", None)
    recipe.check_supported(tensor_type(spec), model_type)
    for step in recipe.steps:
        step.check_spec(spec)
    for step in recipe.steps:
        step.check_architecture(model_type)
    adapter = ADAPTERS.get(model_type or "")
    if adapter is not None and adapter.experts is not None and not _handles_experts(recipe, spec):
        raise _experts_refusal(recipe, spec, str(model_type))


def _quantize_routers(model: nn.Module, spec: QuantSpec) -> None:
    """Round every MoE router's weight to nearest in place (per channel or group like any
    weight) and mark it for the coverage account.  In place because some routers are not plain
    linears (Llama 4's returns two tensors); their inputs stay in full precision."""
    fmt = QuantFormat(bits=spec.w.bits, kind=spec.w.format, sym=spec.w.sym)
    for module in routers(model).values():
        weight = weight_of(module)
        weight.data = quantize_weight(weight.data, fmt, spec.w.granularity, spec.w.group_size)[0]
        setattr(module, QUANTIZED_PARAMS_ATTR, {"weight": f"{spec.label} router, rounded to nearest"})


NOT_CALLED_REASON = (
    "the model never calls this linear as a module (it multiplies by its .weight itself, as Mamba does with "
    "dt_proj), so its weight is quantized but its input cannot be"
)


@torch.no_grad()
def linears_not_called(model: nn.Module, linears: dict[str, nn.Linear]) -> set[str]:
    """The linears a short forward of the model never calls as modules: their weights take
    effect (the model reads ``.weight``) but an input quantizer on them would be a silent no-op,
    so a WA cell records their inputs as full precision instead of claiming them quantized."""
    called: set[str] = set()
    handles = [lin.register_forward_pre_hook(lambda _m, _a, _n=name: called.add(_n)) for name, lin in linears.items()]
    placement = current_placement(model)
    try:
        with streamed(model, placement):
            model(torch.arange(1, 9, device=placement.compute)[None, :], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return set(linears) - called


def _activation_quantizer(spec: QuantSpec) -> ActivationQuantizer:
    return ActivationQuantizer(
        QuantFormat(bits=spec.a.bits, kind=spec.a.format, sym=spec.a.sym), spec.a.granularity, spec.a.dynamic
    )


def _quantize_fused_experts(
    model: nn.Module, spec: QuantSpec, recipe: Recipe, act_quantizers: list[ActivationQuantizer]
) -> int:
    """Quantize every fused-experts tensor per expert (as its own linear would be) and, for WA
    specs, the inputs of its matmuls (qeval.quant.experts.quantize_expert_inputs: one quantizer
    per tensor, shared by its experts, appended to ``act_quantizers`` for static calibration);
    mark them for the coverage account.  Returns the number of tensors.

    Tensors the rounding already decided (GPTQ, OmniQuant: marked on the module) keep its
    result; the rest are rounded to nearest here (after AWQ's or SmoothQuant's scaling).
    """
    fused = find_fused_experts(model)
    if not fused:
        return 0
    fmt = QuantFormat(bits=spec.w.bits, kind=spec.w.format, sym=spec.w.sym)
    n = 0
    for experts in fused:
        module = model.get_submodule(experts.path)
        marked: dict[str, str] = {}
        inputs: dict[str, nn.Module] = {}
        done = getattr(module, QUANTIZED_PARAMS_ATTR, None) or {}  # by the rounding itself (GPTQ)
        for param in experts.params:
            tensor = getattr(module, param.name)
            if param.name in done:
                marked[param.name] = f"{spec.label} {done[param.name]}"
            else:
                tensor.data = quantize_experts(tensor.data, param.layout, fmt, spec.w.granularity, spec.w.group_size)
                marked[param.name] = f"{spec.label} per expert ({param.layout})"
            if quantized(spec.a):
                inputs[param.name] = aq = _activation_quantizer(spec).to(tensor.device)
                act_quantizers.append(aq)
            n += 1
        setattr(module, QUANTIZED_PARAMS_ATTR, marked)
        if inputs:
            quantize_expert_inputs(module, inputs)
    return n


def _quantize_embeddings(model: nn.Module, wspec: Any) -> None:
    """Quantize the input embedding table row by row (one row = one token).

    Called after the head was untied from it (see quantize_model), so the
    head keeps its own precision.
    """
    emb = input_embeddings(model)
    fmt = QuantFormat(bits=wspec.bits, kind=wspec.format, sym=wspec.sym)
    deq, _ = quantize_weight(weight_of(emb).data, fmt, wspec.granularity, wspec.group_size)
    emb.weight = nn.Parameter(deq, requires_grad=False)


@torch.no_grad()
def _calibrate_static(model: nn.Module, quantizers: list[ActivationQuantizer], batches: Iterable[torch.Tensor]) -> None:
    placement = current_placement(model)
    with streamed(model, placement):
        for batch in tqdm(list(batches), desc="calibrating static activation scales", leave=False):
            model(batch.to(placement.compute))
    for q in quantizers:
        q.freeze()


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    recipe: Recipe | Step,
    calibration: Callable[[], list[torch.Tensor]] | None = None,
    keep_codes: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place according to ``spec`` with ``recipe`` (its transforms in
    order, then its rounding; a bare step is a one-step recipe).

    ``calibration`` returns calibration batches; it is called at most once, and
    only when a step or static activation scales need it.  ``keep_codes``: keep each quantized
    linear's integer codes and scales (``QuantLinear.qweight``) for an exporter or the
    quantized-model cache; without them the quantized model costs what the model did.
    Linears are replaced one at a time, each original weight freed as its rounded copy appears.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.of([recipe])
    model_type = getattr(model.config, "model_type", None)
    recipe.check_supported(tensor_type(spec), model_type)
    if quantized(spec.w):
        for step in recipe.steps:  # the architectural reason first, as before loading
            step.check_architecture(model_type)
        for step in recipe.steps:
            step.check_spec(spec)
    refuse_unsupported_experts(model, spec, recipe)
    # a KV spec on a model without KV layers is refused before any weight is quantized
    kv_layers = kv_layers_or_refuse(model) if quantized(spec.kv) else None
    if calibration is not None:
        calibration = functools.cache(calibration)
    if quantized(spec.w):
        if spec.quantize_embeddings and not spec.quantize_lm_head:
            untie_output_embeddings(model)  # quantizing the embedding must not quantize the head
        calib = calibration() if (recipe.needs_calibration and calibration) else None
        for transform_step in recipe.transforms:  # function-preserving: prepare what is rounded
            transform_step.apply(model, spec, calib if transform_step.needs_calibration else None)
        linears = target_linears(model, spec.quantize_lm_head)
        rounding = recipe.rounding
        rounding.prepare(spec)
        rounding.keep_codes = keep_codes
        weights = rounding.quantize_weights(model, linears, spec.w, calib if rounding.needs_calibration else None)
        act_quantizers: list[ActivationQuantizer] = []
        not_called = linears_not_called(model, linears) if quantized(spec.a) else set()
        n_linears = len(linears)
        for name in list(linears):
            deq, qt = weights[name]
            qt = qt if keep_codes else None
            linear = linears.pop(name)  # the last reference but the model's: freed once replaced
            aq = None
            if quantized(spec.a) and name not in not_called:
                aq = _activation_quantizer(spec).to(linear.weight.device)  # its buffers beside the weight
                act_quantizers.append(aq)
            transform = getattr(linear, INPUT_TRANSFORM_ATTR, None)
            quant_linear = QuantLinear(linear, deq, qt, aq, transform)
            if name in not_called:
                setattr(quant_linear, INPUT_NOT_CALLED_ATTR, NOT_CALLED_REASON)
            replace_module(model, name, quant_linear)
            del linear, quant_linear, deq, qt
        del weights
        if not_called:
            log.warning("inputs of %d linears stay in full precision: %s", len(not_called), NOT_CALLED_REASON)
        n_experts = _quantize_fused_experts(model, spec, recipe, act_quantizers)
        if spec.quantize_router:
            _quantize_routers(model, spec)
        if spec.quantize_embeddings:
            _quantize_embeddings(model, spec.w)
        if quantized(spec.a) and not spec.a.dynamic:
            if calibration is None:
                raise ValueError("static activation quantization needs calibration data")
            _calibrate_static(model, act_quantizers, calibration())
        log.info(
            "quantized %d linear layers%s (%s)",
            n_linears,
            f" and {n_experts} fused expert tensors" if n_experts else "",
            recipe.name,
        )
    if quantized(spec.kv):
        install_kv_for_spec(model, spec.kv, kv_layers)
    return model
