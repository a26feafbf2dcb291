"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For each norm and the linears it feeds (norm -> q, k, v; norm -> gate, up / fc1),
per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

from the channel maxima of the calibration activations (taken block by block,
on the inputs the already-smoothed earlier blocks produce) and of the weights.
X is divided by s (folded into the norm's weight, Gemma's ``1 + weight`` and
LayerNorm's bias included) and W multiplied by s, which leaves the model's
function unchanged in full precision; weights are then rounded (RTN) and
activations quantized per token, as the cell's spec says.  As a recipe step it is a
transform: ``method=smoothquant`` rounds with RTN, ``method=[smoothquant,gptq]`` with GPTQ
(the standard W8A8 recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qeval.config import QuantSpec
from qeval.models.adapters import Adapter, get_folding_adapter
from qeval.quant.calibration import BlockInputs, collect_linear_inputs, run_blockwise
from qeval.quant.experts import FusedExperts, as_rows, find_fused_experts, routers
from qeval.quant.methods.base import Transform
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import fold_into_norm, max_abs_per_input_channel, scale_inputs
from qeval.quant.typing_helpers import linear_at, weight_of


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    act_max = act_max.clamp(min=1e-5)
    weight_max = weight_max.clamp(min=1e-5)
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_model(model: nn.Module, batches: list[torch.Tensor], alpha: float) -> None:
    """Apply SmoothQuant's rescaling to every norm group of every block (full precision)."""
    adapter = get_folding_adapter(model, "smoothquant")
    fused = {f.path: f for f in find_fused_experts(model)}
    router_by_block = {path.rpartition(".")[0]: module for path, module in routers(model).items()}

    def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        heads = [group.linears[0] for group in adapter.norm_groups]
        experts = f"{adapter.blocks}.{i}.{adapter.experts}" if adapter.experts else ""
        if experts in fused and adapter.experts_norm:  # the experts' input: the norm output every expert reads
            heads.append(str(adapter.experts))
        act_max: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

        collect_linear_inputs(block, heads, inputs, observe)
        for group, head in zip(adapter.norm_groups, heads):
            linears = [linear_at(block, n) for n in group.linears]
            s = smoothing_scales(act_max[head], max_abs_per_input_channel(linears), alpha)
            fold_into_norm(block.get_submodule(group.norm), s, adapter.norm_kind)
            for lin in linears:
                scale_inputs(lin, s)
        if experts in fused and adapter.experts_norm:
            _smooth_experts(
                block, adapter, fused[experts], router_by_block.get(experts.rpartition(".")[0]), act_max, alpha
            )

    run_blockwise(model, adapter, batches, process_block, desc="smoothquant")


def _smooth_experts(
    block: nn.Module,
    adapter: Adapter,
    experts: FusedExperts,
    router: nn.Module | None,
    act_max: dict[str, torch.Tensor],
    alpha: float,
) -> None:
    """One smoothing scale per input channel of the fused experts' input-side tensor, from the
    norm output's channel maxima (the same rows for every expert) and the weight maxima over
    every expert; folded into the norm, multiplied into every expert's columns and the router's
    (which reads the same norm output and stays in full precision), so the function is unchanged."""
    module = block.get_submodule(str(adapter.experts))
    first = experts.params[0]
    rows = as_rows(getattr(module, first.name).data, first.layout)  # a view: scaled in place
    s = smoothing_scales(act_max[str(adapter.experts)], rows.abs().amax(dim=(0, 1)).float(), alpha)
    fold_into_norm(block.get_submodule(str(adapter.experts_norm)), s, adapter.norm_kind)
    rows.mul_(s.to(rows.dtype)[None, None, :])
    if router is not None:
        weight = weight_of(router)
        weight.mul_(s.to(weight.dtype)[None, :])


@dataclass(frozen=True)
class SmoothQuantParams:
    alpha: float = 0.5  # migration strength; 0.8-0.85 is typical for Llama-like models

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"method.smoothquant.alpha={self.alpha}: allowed 0..1")


@register_method
class SmoothQuant(Transform):
    """Function-preserving: the rounding that follows (RTN unless the recipe names one) sees
    smoothed weights and activations."""

    name = "smoothquant"
    uses_adapter = True
    folds_scales = True
    tensor_types = frozenset({"WA", "WA+KV"})
    needs_calibration = True
    Params = SmoothQuantParams
    alpha: float

    def apply(self, model: nn.Module, spec: QuantSpec, calib: list[torch.Tensor] | None) -> None:
        if calib is None:
            raise ValueError("smoothquant needs calibration data")
        smooth_model(model, calib, self.alpha)
