"""AWQ (Lin et al., 2024): protect the weight channels that see large activations
by scaling them up before rounding, and clip weight groups where that lowers error.

Per block, for every group of linears sharing an input (norm -> q, k, v;
v -> o when shapes allow; norm -> gate, up / fc1; up -> down / fc1 -> fc2),
from the adapter table:

1. x_bar_j = mean |x_j| over the calibration tokens of the shared input.
2. Grid search over alpha in {0, 0.05, ..., 0.95}: s = x_bar^alpha, normalised by
   sqrt(max(s) * min(s)); the linears' weights are multiplied by s, quantized,
   divided by s again, and the MSE of the linears' outputs on the calibration
   inputs is measured against full precision.  The best s is kept, folded into
   the producer of the input (norm or previous linear, a function-preserving
   change) and into the weights.
3. Clip search, per linear except q/k: for every output row and group, the
   group's range is shrunk by 0 .. 45 % in 20 steps, and the shrink that
   minimises the error of the group's partial products x_g . w_g is kept.

Weights are then rounded with the clipped ranges (RTN on the transformed model).
The output MSE is taken over the linears of the group (not the whole attention
module), which needs no attention-specific code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qeval.models.adapters import get_folding_adapter
from qeval.quant.calibration import BlockInputs, collect_linear_inputs, run_blockwise
from qeval.quant.formats import QuantFormat, fake_quantize, group_view, quantize_weight
from qeval.quant.methods.base import QuantMethod
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import fold_into_linear_output, fold_into_norm, scale_inputs
from qeval.quant.typing_helpers import linear_at

ALPHAS = [i / 20 for i in range(20)]
CLIP_RATIOS = [1 - 0.45 * i / 20 for i in range(20)]


@torch.no_grad()
def search_scales(
    x: torch.Tensor, linears: list[nn.Linear], fmt: QuantFormat, granularity: str, group_size: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale (and its alpha) minimising the linears' output MSE."""
    x = x.float()
    x_bar = x.abs().mean(dim=0)
    ref = [x @ lin.weight.float().T for lin in linears]
    best = (float("inf"), torch.ones_like(x_bar), 0.0)
    for alpha in ALPHAS:
        s = x_bar.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for lin, y in zip(linears, ref):
            wq = quantize_weight(lin.weight.float() * s, fmt, granularity, group_size)[0] / s
            err += (x @ wq.T - y).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def search_clip(
    x: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, group_size: int, max_tokens: int = 512
) -> torch.Tensor:
    """Per (row, group) shrink ratio of the weight range minimising the partial-product error.

    Returns the clipped weights (same shape as ``w``)."""
    rows, cols = w.shape
    gs = group_size if 0 < group_size < cols else cols
    x = x[torch.linspace(0, x.shape[0] - 1, min(max_tokens, x.shape[0])).long()].float()
    wg = group_view(w.float(), gs)  # [rows, groups, gs]; a partial last group is padded
    xp = x.new_zeros(x.shape[0], wg.shape[1] * gs)  # ...and its padded inputs are zero,
    xp[:, :cols] = x  # so padding adds nothing to any partial product
    xg = xp.reshape(x.shape[0], wg.shape[1], gs)
    ref = torch.einsum("ngk,rgk->nrg", xg, wg)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_w = wg.clone()
    for r in CLIP_RATIOS:
        clipped = torch.clamp(wg, r * lo, r * hi)
        q = fake_quantize(clipped, fmt, gs)
        err = (torch.einsum("ngk,rgk->nrg", xg, q) - ref).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], clipped, best_w)
    return best_w.reshape(rows, -1)[:, :cols].to(w.dtype)


@dataclass(frozen=True)
class AWQParams:
    clip: bool = True  # weight-clip search after the scale search
    max_tokens: int = 4096  # calibration tokens used per search (evenly spaced)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"method.awq.max_tokens={self.max_tokens}: allowed a positive integer")


@register_method
class AWQ(QuantMethod):
    name = "awq"
    uses_adapter = True
    folds_scales = True
    tensor_types = frozenset({"W", "W+KV"})
    needs_calibration = True

    Params = AWQParams
    clip: bool
    max_tokens: int

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any, calib: Any = None
    ) -> dict[str, tuple[torch.Tensor, Any]]:
        adapter = get_folding_adapter(model, "awq")
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        gran, gsize = spec.granularity, spec.group_size

        def gather(block: nn.Module, names: list[str], inputs: BlockInputs) -> dict[str, torch.Tensor]:
            xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            collect_linear_inputs(block, names, inputs, lambda n, x: xs[n].append(x.reshape(-1, x.shape[-1])))
            out = {}
            for n, chunks in xs.items():
                x = torch.cat(chunks)
                if x.shape[0] > self.max_tokens:  # evenly spaced tokens keep the search cheap
                    x = x[torch.linspace(0, x.shape[0] - 1, self.max_tokens).long()]
                out[n] = x
            return out

        def process_block(_i: int, block: nn.Module, inputs: BlockInputs) -> None:
            # 1. scale search for every group sharing an input.  The folds preserve the
            #    block's function (weights are not rounded yet), so one pass before any fold
            #    gives every group the input it will see, except for its own fold
            groups: list[tuple[str, str, tuple[str, ...]]] = []
            for group, pair in zip(adapter.norm_groups, adapter.linear_pairs):
                groups.append(("norm", group.norm, group.linears))
                if block.get_submodule(pair.prev).out_features == block.get_submodule(pair.next).in_features:
                    groups.append(("linear", pair.prev, (pair.next,)))
                # else v -> o under grouped-query attention: shapes don't allow a per-channel fold
            xs = gather(block, [names[0] for _kind, _producer, names in groups], inputs)
            for kind, producer, names in groups:
                lins = [linear_at(block, n) for n in names]
                s, _alpha = search_scales(xs[names[0]], lins, fmt, gran, gsize)
                if kind == "norm":
                    fold_into_norm(block.get_submodule(producer), s, adapter.norm_kind)
                else:
                    fold_into_linear_output(linear_at(block, producer), s)
                for lin in lins:
                    scale_inputs(lin, s)
            # 2. clip search on the transformed weights (q/k skipped: their errors are
            #    re-weighted by softmax, partial products say little about them)
            if self.clip and fmt.kind == "int" and gran != "tensor":
                clip_names = [n for n in adapter.block_linears() if not n.endswith(("q_proj", "k_proj"))]
                xs = gather(block, clip_names, inputs)
                for n in clip_names:
                    lin = linear_at(block, n)
                    lin.weight.data = search_clip(xs[n], lin.weight.data, fmt, gsize if gran == "group" else -1)

        run_blockwise(model, adapter, calib, process_block, desc="awq")
        return self.round_remaining(linears, {}, spec)  # RTN with the clipped ranges
