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
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.kv import install_kv_quantization, kv_quantizer_from_spec
from qeval.quant.linear import ActivationQuantizer, QuantLinear, replace_module
from qeval.quant.methods import Step
from qeval.quant.methods.quarot import INPUT_TRANSFORM_ATTR
from qeval.quant.recipe import Recipe
from qeval.quant.transforms import untie_output_embeddings
from qeval.quant.typing_helpers import input_embeddings, output_embeddings, weight_of

log = logging.getLogger(__name__)


def target_linears(model: nn.Module, quantize_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model except the output projection (unless asked).

    Architecture-agnostic on purpose: the output embedding is found through
    ``get_output_embeddings()``, not by name.
    """
    head = output_embeddings(model) if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (quantize_lm_head or module is not head)
    }


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
    for batch in tqdm(list(batches), desc="calibrating static activation scales", leave=False):
        model(batch)
    for q in quantizers:
        q.freeze()


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    recipe: Recipe | Step,
    calibration: Callable[[], list[torch.Tensor]] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place according to ``spec`` with ``recipe`` (its transforms in
    order, then its rounding; a bare step is a one-step recipe).

    ``calibration`` returns calibration batches; it is called at most once, and
    only when a step or static activation scales need it.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.of([recipe])
    recipe.check_supported(tensor_type(spec), getattr(model.config, "model_type", None))
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
        weights = rounding.quantize_weights(model, linears, spec.w, calib if rounding.needs_calibration else None)
        act_quantizers: list[ActivationQuantizer] = []
        for name, linear in linears.items():
            deq, qt = weights[name]
            aq = None
            if quantized(spec.a):
                aq = ActivationQuantizer(
                    QuantFormat(bits=spec.a.bits, kind=spec.a.format, sym=spec.a.sym),
                    spec.a.granularity,
                    spec.a.dynamic,
                )
                act_quantizers.append(aq)
            transform = getattr(linear, INPUT_TRANSFORM_ATTR, None)
            replace_module(model, name, QuantLinear(linear, deq, qt, aq, transform))
        if spec.quantize_embeddings:
            _quantize_embeddings(model, spec.w)
        if quantized(spec.a) and not spec.a.dynamic:
            if calibration is None:
                raise ValueError("static activation quantization needs calibration data")
            _calibrate_static(model, act_quantizers, calibration())
        log.info("quantized %d linear layers (%s)", len(linears), recipe.name)
    if quantized(spec.kv):
        install_kv_quantization(model, kv_quantizer_from_spec(spec.kv))
    return model
