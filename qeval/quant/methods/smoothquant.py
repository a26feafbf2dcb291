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
from qeval.models.adapters import get_folding_adapter
from qeval.quant.calibration import BlockInputs, collect_linear_inputs, run_blockwise
from qeval.quant.experts import expert_input_rows, find_fused_experts, routers, scale_expert_inputs
from qeval.quant.methods.base import Transform
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import fold_into_norm, max_abs_per_input_channel, scale_inputs
from qeval.quant.typing_helpers import linear_at


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
        groups = adapter.norm_groups_of(block)
        heads = [group.linears[0] for group in groups]
        path = f"{adapter.blocks}.{i}.{adapter.experts}" if adapter.experts else ""
        experts = fused.get(path) if adapter.experts_norm else None
        # the experts read the same norm output as the group behind experts_norm (a shared
        # expert: Llama 4, DeepSeek-V3), or alone (Mixtral, Qwen3-MoE): one scale for all readers
        joint = experts is not None and any(g.norm == adapter.experts_norm for g in groups)
        if experts is not None and not joint:
            heads.append(str(adapter.experts))
        act_max: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

        collect_linear_inputs(block, heads, inputs, observe)
        router = router_by_block.get(path.rpartition(".")[0])
        for group, head in zip(groups, heads):
            linears = [linear_at(block, n) for n in group.linears]
            weight_max = max_abs_per_input_channel(linears)
            rows = None
            if joint and group.norm == adapter.experts_norm:
                assert experts is not None
                rows = expert_input_rows(block.get_submodule(str(adapter.experts)), experts)
                weight_max = torch.maximum(weight_max, rows.abs().amax(dim=(0, 1)).float())
            s = smoothing_scales(act_max[head], weight_max, alpha)
            fold_into_norm(block.get_submodule(group.norm), s, adapter.norm_kind)
            for lin in linears:
                scale_inputs(lin, s)
            if rows is not None:
                scale_expert_inputs(rows, router, s)
        if experts is not None and not joint:
            rows = expert_input_rows(block.get_submodule(str(adapter.experts)), experts)
            s = smoothing_scales(act_max[str(adapter.experts)], rows.abs().amax(dim=(0, 1)).float(), alpha)
            fold_into_norm(block.get_submodule(str(adapter.experts_norm)), s, adapter.norm_kind)
            scale_expert_inputs(rows, router, s)

    run_blockwise(model, adapter, batches, process_block, desc="smoothquant")


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
    handles_experts = True
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
