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

from qeval.errors import UnsupportedCellError
from qeval.models.adapters import get_folding_adapter, present
from qeval.quant.calibration import BlockInputs, block_output, collect_linear_inputs, run_blockwise
from qeval.quant.experts import (
    MIN_EXPERT_TOKENS,
    FusedExperts,
    as_rows,
    collecting_expert_inputs,
    expert_input_rows,
    find_fused_experts,
    routers,
    scale_expert_inputs,
    use_eager_experts,
)
from qeval.quant.formats import QuantFormat, fake_quantize, group_view, quantize_weight
from qeval.quant.methods.base import QuantMethod, WeightResults
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import fold_into_linear_output, fold_into_norm, scale_inputs
from qeval.quant.typing_helpers import linear_at

ALPHAS = [i / 20 for i in range(20)]
# linears whose outputs include queries or keys (fused ones too): their errors are re-weighted by
# the softmax, so partial products say little about them and the clip search leaves them alone
NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
CLIP_RATIOS = [1 - 0.45 * i / 20 for i in range(20)]


@torch.no_grad()
def search_scales(
    x: torch.Tensor,
    linears: list[nn.Linear],
    fmt: QuantFormat,
    granularity: str,
    group_size: int,
    routed: list[tuple[torch.Tensor, torch.Tensor]] = (),  # type: ignore[assignment]
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale (and its alpha) minimising the linears' output MSE.

    ``routed``: (inputs, weight [out, in]) of each expert reading the same channels (the
    tokens routed to it, which may be scaled by its router score): its error counts in
    proportion to its share of the routed tokens, so all experts together weigh as one linear
    and a rarely routed expert cannot steer the scale."""
    x = x.float()
    x_bar = x.abs().mean(dim=0)
    ref = [x @ lin.weight.float().T for lin in linears]
    routed = [(xe.float(), we.float()) for xe, we in routed if xe.shape[0]]
    total = sum(xe.shape[0] for xe, _ in routed)
    routed_ref = [xe @ we.T for xe, we in routed]
    best = (float("inf"), torch.ones_like(x_bar), 0.0)
    for alpha in ALPHAS:
        s = x_bar.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for lin, y in zip(linears, ref):
            wq = quantize_weight(lin.weight.float() * s, fmt, granularity, group_size)[0] / s
            err += (x @ wq.T - y).pow(2).mean().item()
        for (xe, we), y in zip(routed, routed_ref):
            wq = quantize_weight(we * s, fmt, granularity, group_size)[0] / s
            err += (xe @ wq.T - y).pow(2).mean().item() * xe.shape[0] / total
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
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    best_w = wg.clone()
    for r in CLIP_RATIOS:
        clipped = torch.clamp(wg, r * lo, r * hi)
        q = fake_quantize(clipped, fmt, gs)
        err = (torch.einsum("ngk,rgk->nrg", xg, q) - ref).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], clipped, best_w)
    return best_w.reshape(rows, -1)[:, :cols].to(w.dtype)


#: formats whose rounding the clip search tunes: integer grids and the FP4/MX element grids
#: (FP8's per-group scales keep their 8-bit behaviour: no clip, as before)
CLIPPED_FORMATS = ("int", "nvfp4", "mxfp4", "mxfp8")


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
    handles_experts = True
    uses_adapter = True
    folds_scales = True
    tensor_types = frozenset({"W", "W+KV"})
    needs_calibration = True

    Params = AWQParams
    clip: bool
    max_tokens: int

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any, calib: Any = None
    ) -> WeightResults:
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

        def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            # 1. scale search for every group sharing an input.  The folds preserve the
            #    block's function (weights are not rounded yet), so one pass before any fold
            #    gives every group the input it will see, except for its own fold
            groups: list[tuple[str, str, tuple[str, ...], slice]] = [
                ("norm", group.norm, group.linears, slice(None)) for group in adapter.norm_groups_of(block)
            ]
            for pair in adapter.pairs_of(block):
                rows = pair.rows(model.config)
                width = len(range(*rows.indices(linear_at(block, pair.prev).out_features)))
                if width == linear_at(block, pair.next).in_features:
                    groups.append(("linear", pair.prev, (pair.next,), rows))
                # else v -> o under grouped-query attention: shapes don't allow a per-channel fold
            # fused experts read the output of experts_norm (as does the router, and a shared
            # expert where there is one): their scale is searched with that group's, or alone
            path = f"{adapter.blocks}.{i}.{adapter.experts}" if adapter.experts else ""
            experts = fused.get(path)
            router = next(
                (local for p, local in router_paths.items() if p.rpartition(".")[0] == path.rpartition(".")[0]), None
            )
            module = block.get_submodule(str(adapter.experts)) if experts is not None else None
            if experts is not None and not any(g[1] == adapter.experts_norm for g in groups):
                if router is None:
                    raise UnsupportedCellError(f"awq on {path}: no router found to read the experts' input from")
                groups.append(("norm", str(adapter.experts_norm), (), slice(None)))
            heads = {names[0] if names else str(router) for _kind, _producer, names, _rows in groups}
            xs = gather(block, sorted(heads), inputs)
            for kind, producer, names, rows in groups:
                lins = [linear_at(block, n) for n in names]
                with_experts = experts is not None and kind == "norm" and producer == adapter.experts_norm
                routed = []
                if with_experts:
                    assert experts is not None and module is not None
                    first = experts.params[0]
                    routed_x = self._routed_inputs(block, module, first.name, experts.num_experts, inputs)
                    routed = list(zip(routed_x, expert_input_rows(module, experts)))
                s, _alpha = search_scales(xs[names[0] if names else str(router)], lins, fmt, gran, gsize, routed)
                if kind == "norm":
                    fold_into_norm(block.get_submodule(producer), s, adapter.norm_kind)
                else:
                    fold_into_linear_output(linear_at(block, producer), s, rows)
                for lin in lins:
                    scale_inputs(lin, s)
                if with_experts:
                    assert experts is not None and module is not None
                    scale_expert_inputs(
                        expert_input_rows(module, experts), block.get_submodule(str(router)) if router else None, s
                    )
            # 2. clip search on the transformed weights (NO_CLIP skipped)
            if self.clip and fmt.kind in CLIPPED_FORMATS and gran != "tensor":
                clip_names = [n for n in present(block, adapter.block_linears()) if not n.endswith(NO_CLIP)]
                xs = gather(block, clip_names, inputs)
                for n in clip_names:
                    lin = linear_at(block, n)
                    lin.weight.data = search_clip(xs[n], lin.weight.data, fmt, gsize if gran == "group" else -1)
                if experts is not None and module is not None:
                    self._clip_experts(block, module, experts, inputs, fmt, gsize if gran == "group" else -1)

        fused = {f.path: f for f in find_fused_experts(model)}
        router_paths = {p: p[len(adapter.blocks) + 1 :].partition(".")[2] for p in routers(model)}
        run_blockwise(model, adapter, calib, process_block, desc="awq")
        return self.round_remaining(linears, {}, spec)  # RTN with the clipped ranges (experts: in apply)

    def _routed_inputs(
        self, block: nn.Module, module: nn.Module, name: str, count: int, inputs: BlockInputs
    ) -> list[torch.Tensor]:
        """Each expert's inputs to its matmul on the fused tensor ``name`` ([tokens, in], evenly
        spaced, at most max_tokens; no rows for an expert no calibration token reached)."""
        chunks: list[list[torch.Tensor]] = [[] for _ in range(count)]
        use_eager_experts(module)
        weight = getattr(module, name)
        with collecting_expert_inputs(weight, lambda e, x: chunks[e].append(x.reshape(-1, x.shape[-1]))):
            for h in inputs.hidden:
                block_output(block, h, inputs.kwargs)
        out = []
        for c in chunks:
            x = torch.cat(c) if c else weight.new_zeros(0, weight.shape[-1])
            if x.shape[0] > self.max_tokens:
                x = x[torch.linspace(0, x.shape[0] - 1, self.max_tokens).long()]
            out.append(x)
        return out

    def _clip_experts(
        self, block: nn.Module, module: nn.Module, experts: FusedExperts, inputs: BlockInputs, fmt: QuantFormat, gs: int
    ) -> None:
        """The clip search on every expert's weights with the tokens routed to it; an expert
        routed fewer than MIN_EXPERT_TOKENS keeps its full range (rounded to nearest), never a
        range searched on nothing."""
        for param in experts.params:
            routed = self._routed_inputs(block, module, param.name, experts.num_experts, inputs)
            rows = as_rows(getattr(module, param.name).data, param.layout)  # a view: clipped in place
            for e, x in enumerate(routed):
                if x.shape[0] >= MIN_EXPERT_TOKENS:
                    rows[e].copy_(search_clip(x, rows[e], fmt, gs))
