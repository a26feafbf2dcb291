"""OmniQuant (Shao et al., 2024): learn the quantization parameters block by block.

Learnable weight clipping (LWC): every weight group's quantization range is
``[sigmoid(beta) * min(W_g), sigmoid(gamma) * max(W_g)]`` (symmetric formats:
``sigmoid(gamma) * max|W_g|``), with gamma and beta initialised so the factor is
close to 1 (``init`` = 4 gives 0.982).  Rounding uses a straight-through
estimator, so the loss gradient reaches gamma and beta.  For each decoder block,
AdamW minimises the MSE between the block's full-precision output and its
output with LWC-quantized weights, on the calibration inputs (which are the
outputs of the already-quantized earlier blocks).  The learned ranges are then
frozen into the weights.

Learnable equivalent transformation (LET), for weight-activation cells: per
norm group a learnable per-channel scale s (initialised with SmoothQuant's
``sqrt(max|X| / max|W|)``) and, where the norm has a bias (OPT's LayerNorm), a
shift delta: the norm's output becomes ``(y - delta) / s`` and the linears it
feeds ``W diag(s)`` with bias ``b + W delta``; and a per-channel scale on
v -> o where the shapes allow (no grouped-query attention).  During training
the block's linears see per-token fake-quantized inputs (straight-through), so
the scales learn to make activations easy to quantize.  Afterwards s and delta
are folded into the norms and weights (an exact transformation) and LWC's
ranges are frozen into the weights.  The q/k scaling of the paper is left out:
with rotary embeddings a per-channel scale of q and k does not commute with
the rotation unless tied across rotated pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from qeval.config import quantized
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import get_adapter, get_folding_adapter, present
from qeval.placement import current_placement, to_device
from qeval.quant.calibration import BlockInputs, block_output, collect_linear_inputs, run_blockwise
from qeval.quant.coverage import EXPERT_FALLBACKS_ATTR, QUANTIZED_PARAMS_ATTR
from qeval.quant.experts import (
    MIN_EXPERT_TOKENS,
    FusedExperts,
    as_rows,
    collecting_expert_inputs,
    find_fused_experts,
    quantize_experts,
    use_eager_experts,
)
from qeval.quant.formats import (
    E8M0_EXP_RANGE,
    ELEMENT_EMAX,
    ELEMENT_MAX,
    QuantFormat,
    QuantizedTensor,
    fake_quantize,
    group_view,
    nvfp4_tensor_scale,
    round_elements,
)
from qeval.quant.linear import replace_module
from qeval.quant.methods.base import QuantMethod, WeightResults
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import fold_into_norm, max_abs_per_input_channel
from qeval.quant.typing_helpers import linear_at, tensor_attr


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


#: formats LWC learns clipping for: integer grids and the FP4/MX element grids (symmetric)
LWC_FORMATS = ("int", "nvfp4", "mxfp4", "mxfp8")


def _lwc_float(
    weight: torch.Tensor, w: torch.Tensor, gamma: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LWC on a floating-point element grid (``w`` grouped ``[out, groups, gs]``): the clipped
    absmax ``sigmoid(gamma) * amax`` sets each block's scale by the format's own rule (NVFP4:
    FP8-rounded relative to the weight's tensor scale; MX: the power of two of its floor rule),
    with straight-through rounding of the scale and of the elements, so gamma learns.
    Returns (dequantized, effective scale [out, groups], codes), grouped."""
    hi = torch.sigmoid(gamma) * w.abs().amax(dim=-1)
    if fmt.kind == "nvfp4":
        tensor_scale = nvfp4_tensor_scale(weight.detach())
        relative = hi / ELEMENT_MAX["e2m1"] / tensor_scale
        relative = (
            relative + (relative.clamp(max=ELEMENT_MAX["e4m3"]).to(torch.float8_e4m3fn).float() - relative).detach()
        )
        scale = relative * tensor_scale
    else:
        exponent = torch.log2(hi.clamp(min=2.0**-126))
        exponent = exponent + (torch.floor(exponent) - exponent).detach()
        scale = torch.exp2((exponent - ELEMENT_EMAX[fmt.element]).clamp(*E8M0_EXP_RANGE))
    scale = scale.clamp(min=1e-12)
    scaled = (w / scale[..., None]).clamp(-fmt.fp_max, fmt.fp_max)
    codes = scaled + (round_elements(scaled, fmt) - scaled).detach()
    return codes * scale[..., None], scale, codes


def lwc_quantize(
    weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, fmt: QuantFormat, gs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fake-quantize ``weight`` ([out, in]) with learnable clipping of each (row, group) range:
    (dequantized [out, in], scale [out, groups], zero or None, codes [out, in]); differentiable
    in gamma and beta through the straight-through rounding."""
    cols = weight.shape[1]
    w = group_view(weight.float(), gs)
    if fmt.kind != "int":
        deq, scale, codes = _lwc_float(weight, w, gamma, fmt)
        out = w.shape[0]
        return deq.reshape(out, -1)[:, :cols], scale, None, codes.reshape(out, -1)[:, :cols]
    if fmt.sym:
        hi = torch.sigmoid(gamma) * w.abs().amax(dim=-1)
        scale = (hi / fmt.qmax).clamp(min=1e-8)
        codes = torch.clamp(_round_ste(w / scale[..., None]), fmt.qmin, fmt.qmax)
        deq, zero = codes * scale[..., None], None
    else:
        hi = torch.sigmoid(gamma) * w.amax(dim=-1).clamp(min=0)
        lo = torch.sigmoid(beta) * w.amin(dim=-1).clamp(max=0)
        scale = ((hi - lo) / fmt.qmax).clamp(min=1e-8)
        zero = _round_ste(-lo / scale)
        codes = torch.clamp(_round_ste(w / scale[..., None]) + zero[..., None], 0, fmt.qmax)
        deq = (codes - zero[..., None]) * scale[..., None]
    out = w.shape[0]
    return deq.reshape(out, -1)[:, :cols], scale, zero, codes.reshape(out, -1)[:, :cols]


class LWCExperts(nn.Module):
    """A parametrization of one fused expert tensor: every expert's weight fake-quantized with
    learnable clipping per (expert, output row, group), exactly as LWCLinear treats the weight
    of an unfused expert of the same shape."""

    def __init__(self, weight: torch.Tensor, layout: str, fmt: QuantFormat, group_size: int, init: float) -> None:
        super().__init__()
        if fmt.kind not in LWC_FORMATS:
            raise ValueError(f"learnable weight clipping is defined for formats {', '.join(LWC_FORMATS)}")
        self.layout, self.fmt = layout, fmt
        experts, out, cols = as_rows(weight, layout).shape
        self.gs = group_size if 0 < group_size < cols else cols
        shape = group_view(weight.new_zeros(experts * out, cols).float(), self.gs).shape[:2]
        self.gamma = nn.Parameter(torch.full(shape, init, device=weight.device))
        self.beta = nn.Parameter(torch.full(shape, init, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = as_rows(weight, self.layout)
        experts, out, cols = rows.shape
        if self.fmt.kind == "nvfp4":  # a tensor scale per expert, as its own linear would have
            deq = torch.stack(
                [
                    lwc_quantize(rows[e], self.gamma[e * out : (e + 1) * out], self.beta, self.fmt, self.gs)[0]
                    for e in range(experts)
                ]
            )
        else:
            deq = lwc_quantize(rows.reshape(experts * out, cols), self.gamma, self.beta, self.fmt, self.gs)[0]
        deq = deq.reshape(experts, out, cols).to(weight.dtype)
        return deq if self.layout == "out_in" else deq.transpose(1, 2)


class LWCLinear(nn.Module):
    """A linear whose weight is fake-quantized with learnable clipping factors.

    With LET, the weight first becomes ``W diag(in_scale) / out_scale`` (bias
    ``(b + W in_shift) / out_scale``); ``in_scale``/``in_shift`` are shared by the
    linears reading the same norm, ``out_scale`` belongs to v in a v -> o pair."""

    def __init__(
        self,
        linear: nn.Linear,
        fmt: QuantFormat,
        group_size: int,
        init: float = 4.0,
        act_fmt: QuantFormat | None = None,
    ) -> None:
        super().__init__()
        if fmt.kind not in LWC_FORMATS:
            raise ValueError(f"learnable weight clipping is defined for formats {', '.join(LWC_FORMATS)}")
        self.linear, self.fmt, self.act_fmt = linear, fmt, act_fmt
        cols = linear.in_features
        self.gs = group_size if 0 < group_size < cols else cols
        self.cols = cols
        shape = group_view(linear.weight.detach().float(), self.gs).shape[:2]  # [out, groups]
        self.gamma = nn.Parameter(torch.full(shape, init, device=linear.weight.device))
        self.beta = nn.Parameter(torch.full(shape, init, device=linear.weight.device))
        self.in_scale: nn.Parameter | None = None
        self.in_shift: nn.Parameter | None = None
        self.out_scale: nn.Parameter | None = None

    def transformed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LET-transformed float weight and bias."""
        w = self.linear.weight.float()
        b = None if self.linear.bias is None else self.linear.bias.float()
        if self.in_shift is not None:
            shift = w @ self.in_shift
            b = shift if b is None else b + shift
        if self.in_scale is not None:
            w = w * self.in_scale.clamp(min=1e-5)[None, :]
        if self.out_scale is not None:
            o = self.out_scale.clamp(min=1e-5)
            w = w / o[:, None]
            b = None if b is None else b / o
        return w, b

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(dequantized weight [out, in], scale [out, groups], zero or None, codes [out, in])."""
        return lwc_quantize(self.transformed()[0], self.gamma, self.beta, self.fmt, self.gs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fmt is not None:  # per-token input quantization, straight-through
            x = x + (fake_quantize(x, self.act_fmt, None) - x).detach()
        bias = self.transformed()[1]
        return F.linear(x, self.quantized()[0].to(x.dtype), None if bias is None else bias.to(x.dtype))


class LETNorm(nn.Module):
    """A norm whose output is shifted and scaled: ``(norm(x) - shift) / scale``."""

    def __init__(self, norm: nn.Module, scale: nn.Parameter, shift: nn.Parameter | None) -> None:
        super().__init__()
        self.norm, self.scale, self.shift = norm, scale, shift

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped norm's weight: some blocks read it (Mamba casts its input to its dtype)."""
        return tensor_attr(self.norm, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.shift is not None:
            y = y - self.shift.to(y.dtype)
        return y / self.scale.clamp(min=1e-5).to(y.dtype)


@dataclass(frozen=True)
class OmniQuantParams:
    # OmniQuant trains for 20-40 epochs over 128 samples with lwc_lr=0.01 (thousands of AdamW steps);
    # on a CPU budget of 16 samples x 2 epochs (32 steps per block) the clipping factors need a
    # larger step to move: lwc_lr=0.1 gave W3g128 74.6 on SmolLM2 where 0.005 gave 139.7 (RTN 142.4)
    epochs: int = 2  # AdamW epochs over the calibration set, per block
    lwc_lr: float = 0.1  # learning rate of the clipping factors (LWC)
    let_lr: float = 0.001  # learning rate of the equivalent-transformation scales/shifts (LET, WA cells)
    init: float = 4.0  # sigmoid(4) = 0.982: start close to the full range
    let_alpha: float = 0.5  # SmoothQuant-style initialisation of the LET scales

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"method.omniquant.epochs={self.epochs}: allowed a positive integer")


@register_method
class OmniQuant(QuantMethod):
    name = "omniquant"
    handles_experts = True
    uses_adapter = True
    tensor_types = frozenset({"W", "WA", "W+KV", "WA+KV"})
    needs_calibration = True
    act_spec: Any = None  # the cell's activation spec, for weight-activation cells (see prepare)

    Params = OmniQuantParams
    epochs: int
    lwc_lr: float
    let_lr: float
    init: float
    let_alpha: float

    def __init__(self, params: Any = None, **overrides: Any) -> None:
        super().__init__(params, **overrides)
        self.loss_history: dict[int, list[float]] = {}

    def prepare(self, spec: Any) -> None:
        self.act_spec = spec.a if quantized(spec.a) else None

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any, calib: Any = None
    ) -> WeightResults:
        if spec.granularity not in ("channel", "group") or spec.format not in LWC_FORMATS:
            raise UnsupportedCellError(
                f"omniquant's LWC needs per-channel or per-group scales of format {', '.join(LWC_FORMATS)}; "
                f"this spec has {spec.format} per {spec.granularity}"
            )
        # LWC needs only the blocks; LET (WA cells) folds its scales into the norms
        adapter = (
            get_folding_adapter(model, "omniquant") if self.act_spec is not None else get_adapter(model, "omniquant")
        )
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        group = spec.group_size if spec.granularity == "group" else -1
        results: dict[str, tuple[torch.Tensor, Any]] = {}

        act_fmt = None
        if self.act_spec is not None:
            a = self.act_spec
            if a.granularity != "token" or a.format != "int":
                raise UnsupportedCellError("omniquant's LET trains with dynamic per-token integer activations")
            act_fmt = QuantFormat(bits=a.bits, kind=a.format, sym=a.sym)

        def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            with torch.no_grad():
                targets = [block_output(block, h, inputs.kwargs) for h in inputs.hidden]
            names = [n for n in present(block, adapter.block_linears()) if f"{adapter.blocks}.{i}.{n}" in linears]
            originals = {n: linear_at(block, n) for n in names}
            wrapped = {n: LWCLinear(lin, fmt, group, self.init, act_fmt) for n, lin in originals.items()}
            let_params, norms = self._init_let(block, adapter, inputs, wrapped) if act_fmt else ([], {})
            for n, w in wrapped.items():
                replace_module(block, n, w)
            for name, let_norm in norms.items():
                replace_module(block, name, let_norm)
            path = f"{adapter.blocks}.{i}.{adapter.experts}" if adapter.experts else ""
            experts = fused.get(path)
            module = block.get_submodule(str(adapter.experts)) if experts is not None else None
            lwc_experts = (
                self._parametrize_experts(module, experts, fmt, group)
                if module is not None and experts is not None
                else {}
            )
            clip_params = [p for w in wrapped.values() for p in (w.gamma, w.beta)]
            clip_params += [p for e in lwc_experts.values() for p in (e.gamma, e.beta)]
            groups = [{"params": clip_params, "lr": self.lwc_lr}]
            if let_params:
                groups.append({"params": let_params, "lr": self.let_lr})
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            history = []
            with torch.enable_grad():
                for _epoch in range(self.epochs):
                    total = 0.0
                    for h, target in zip(inputs.hidden, targets):
                        with parametrize.cached():  # the experts' fake-quantized tensors once per step
                            loss = F.mse_loss(block_output(block, h, inputs.kwargs), target)
                            opt.zero_grad()
                            loss.backward()
                        opt.step()
                        total += loss.item()
                    history.append(total / len(targets))
            self.loss_history[i] = history
            with torch.no_grad():
                for name, let_norm in norms.items():  # fold (y - shift) / scale into the norm
                    if let_norm.shift is not None:  # a shift only for a norm with a bias
                        norm_bias = tensor_attr(let_norm.norm, "bias")
                        norm_bias.sub_(let_norm.shift.to(norm_bias.dtype))
                    fold_into_norm(let_norm.norm, let_norm.scale.clamp(min=1e-5), adapter.norm_kind)
                    replace_module(block, name, let_norm.norm)
                for n, w in wrapped.items():
                    deq, scale, zero, codes = w.quantized()
                    bias = w.transformed()[1]
                    lin = originals[n]
                    lin.weight.data = deq.to(lin.weight.dtype)
                    if bias is not None:
                        lin.bias = nn.Parameter(bias.to(lin.weight.dtype), requires_grad=False)
                    tensor_scale = nvfp4_tensor_scale(w.transformed()[0]) if fmt.kind == "nvfp4" else None
                    qt = QuantizedTensor.from_effective_scales(
                        codes.detach(), scale.detach(), zero, w.gs, fmt, tensor_scale
                    )
                    # the Parameter (it follows the block home from the compute device), codes at home
                    kept = to_device(qt, current_placement(block).home) if self.keep_codes else None
                    results[f"{adapter.blocks}.{i}.{n}"] = (lin.weight, kept)
                    replace_module(block, n, lin)
                if module is not None and experts is not None:
                    self._freeze_experts(block, module, experts, inputs, fmt, spec)

        fused = {f.path: f for f in find_fused_experts(model)}
        if fused and act_fmt is not None:
            raise UnsupportedCellError(self.why_not_experts(spec))
        for p in model.parameters():
            p.requires_grad_(False)
        run_blockwise(model, adapter, calib, process_block, desc="omniquant")
        return self.round_remaining(linears, results, spec)

    def why_not_experts(self, spec: Any) -> str:
        """LWC quantizes fused experts (per expert); LET (weight-activation cells) does not."""
        if quantized(spec.a):
            return (
                "omniquant's LET (weight-activation cells) does not scale fused experts (its norm scale would "
                "have to be shared by the router and every expert); weight-only OmniQuant (LWC) quantizes them"
            )
        return ""

    def _parametrize_experts(
        self, module: nn.Module, experts: FusedExperts, fmt: QuantFormat, group: int
    ) -> dict[str, LWCExperts]:
        """Learnable clipping on every fused expert tensor of ``module``, trained with the block's
        linears (the block loss reaches each expert through the tokens routed to it)."""
        use_eager_experts(module)
        out = {}
        for param in experts.params:
            lwc = LWCExperts(getattr(module, param.name).detach(), param.layout, fmt, group, self.init)
            parametrize.register_parametrization(module, param.name, lwc)
            out[param.name] = lwc
        return out

    @torch.no_grad()
    def _freeze_experts(
        self,
        block: nn.Module,
        module: nn.Module,
        experts: FusedExperts,
        inputs: BlockInputs,
        fmt: QuantFormat,
        spec: Any,
    ) -> None:
        """Write the learned clipping's quantized weights into the fused tensors; an expert routed
        fewer than MIN_EXPERT_TOKENS calibration tokens learned nothing about its range and is
        rounded to nearest instead (counted in the record)."""
        originals = {}
        for param in experts.params:
            originals[param.name] = getattr(module.parametrizations, param.name).original.detach().clone()
            parametrize.remove_parametrizations(module, param.name, leave_parametrized=True)
        tokens = [0] * experts.num_experts

        def count(e: int, x: torch.Tensor) -> None:
            tokens[e] += x.reshape(-1, x.shape[-1]).shape[0]

        with collecting_expert_inputs(getattr(module, experts.params[0].name), count):
            for h in inputs.hidden:
                block_output(block, h, inputs.kwargs)
        few = [e for e, n in enumerate(tokens) if n < MIN_EXPERT_TOKENS]
        marks, fallbacks = {}, {}
        for param in experts.params:
            if few:
                rtn = quantize_experts(originals[param.name], param.layout, fmt, spec.granularity, spec.group_size)
                weight = getattr(module, param.name)
                weight.data[few] = rtn[few].to(weight.dtype)
            marks[param.name] = (
                f"OmniQuant LWC per expert ({param.layout}); experts routed fewer than {MIN_EXPERT_TOKENS} "
                "calibration tokens rounded to nearest"
            )
            fallbacks[param.name] = len(few)
        setattr(module, QUANTIZED_PARAMS_ATTR, marks)
        setattr(module, EXPERT_FALLBACKS_ATTR, fallbacks)

    def _init_let(
        self, block: nn.Module, adapter: Any, inputs: BlockInputs, wrapped: dict[str, LWCLinear]
    ) -> tuple[list[nn.Parameter], dict[str, LETNorm]]:
        """LET parameters for a block: SmoothQuant-initialised scales per norm group
        (plus a centring shift for norms with a bias) and unit scales on v -> o."""
        groups = adapter.norm_groups_of(block)
        heads = [g.linears[0] for g in groups]
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)

        collect_linear_inputs(block, heads, inputs, observe)
        params: list[nn.Parameter] = []
        norms: dict[str, LETNorm] = {}
        for group, head in zip(groups, heads):
            members = [n for n in group.linears if n in wrapped]
            if not members:
                continue
            norm = block.get_submodule(group.norm)
            lo, hi = stats[head]
            shift = None
            if getattr(norm, "bias", None) is not None:
                shift = nn.Parameter((hi + lo) / 2)
                lo, hi = lo - shift.detach(), hi - shift.detach()
            act_max = torch.maximum(hi.abs(), lo.abs()).clamp(min=1e-5)
            w_max = max_abs_per_input_channel([wrapped[n].linear for n in members]).clamp(min=1e-5)
            scale = nn.Parameter((act_max.pow(self.let_alpha) / w_max.pow(1 - self.let_alpha)).clamp(min=1e-5))
            for n in members:
                wrapped[n].in_scale, wrapped[n].in_shift = scale, shift
            norms[group.norm] = LETNorm(norm, scale, shift)
            params += [scale] + ([shift] if shift is not None else [])
        # a unit scale on v -> o where it is a whole linear (not a fused linear's row slice) and
        # the shapes allow (no grouped-query attention)
        v_o = next((p for p in adapter.pairs_of(block) if p.per_head and p.prev_rows is None), None)
        if (
            v_o is not None
            and v_o.prev in wrapped
            and v_o.next in wrapped
            and wrapped[v_o.prev].linear.out_features == wrapped[v_o.next].linear.in_features
        ):
            s = nn.Parameter(
                torch.ones(wrapped[v_o.next].linear.in_features, device=wrapped[v_o.next].linear.weight.device)
            )
            wrapped[v_o.prev].out_scale, wrapped[v_o.next].in_scale = s, s
            params.append(s)
        return params, norms
