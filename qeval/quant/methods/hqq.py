"""HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023): calibration-free rounding that
optimizes each group's zero point against a sparsity-promoting error.

With the scale fixed from the group's range, HQQ minimizes ``||W - dq(q(W))||_p^p`` with
``p < 1`` (outliers in the error are tolerated, the bulk is fit) by half-quadratic splitting:
an auxiliary error ``E`` takes the generalized soft-threshold (shrinkage) of the residual,

    E <- shrink_p(W - dq(q(W)), beta)
    zero <- mean over the group of (q(W) - (W - E) / scale)

and ``beta`` grows by ``kappa`` each step.  No data is needed, so it quantizes in seconds
what GPTQ needs calibration for; its zero points are real numbers (not integers), which the
dequantized weights keep (an integer-zero checkpoint cannot express them exactly).

The defaults are the reference implementation's: ``lp_norm=0.7``, ``beta=10``,
``kappa=1.01``, 20 iterations with early stopping when the mean absolute error stops
falling.  Weight-only, asymmetric integer grids per group or channel; fused MoE experts are
optimized per expert, as their own linears would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qeval.config import QuantSpec
from qeval.errors import UnsupportedCellError
from qeval.quant.coverage import QUANTIZED_PARAMS_ATTR
from qeval.quant.experts import as_rows, find_fused_experts
from qeval.quant.formats import QuantFormat, QuantizedTensor, group_view
from qeval.quant.methods.base import QuantMethod, RoundedOnRead, WeightResults
from qeval.quant.methods.registry import register_method


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of the l_p "norm" (p < 1), HQQ's generalized soft threshold:
    ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(
    weight: torch.Tensor,
    fmt: QuantFormat,
    group_size: int | None,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
) -> tuple[torch.Tensor, QuantizedTensor]:
    """HQQ one ``[out, in]`` weight in groups of ``group_size`` along its input (None: per
    row); returns the dequantized weight and its codes, scales and real-valued zero points."""
    cols = weight.shape[-1]
    gs = cols if group_size is None or group_size <= 0 else min(group_size, cols)
    w = group_view(weight.float(), gs)  # [rows, groups, gs]
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / fmt.qmax).clamp(min=1e-8)
    zero = -lo / scale
    best_zero, best_error = zero, float("inf")
    for _ in range(iters):
        q = torch.clamp(torch.round(w / scale + zero), 0, fmt.qmax)
        residual = w - (q - zero) * scale
        error = residual.abs().mean().item()
        if error < best_error:
            best_zero, best_error = zero, error
        elif early_stop:
            break
        target = w - shrink_lp(residual, beta, lp_norm)  # what dq(q) should reproduce
        zero = (q - target / scale).mean(dim=-1, keepdim=True)
        beta *= kappa
    q = torch.clamp(torch.round(w / scale + best_zero), 0, fmt.qmax)
    deq = ((q - best_zero) * scale).reshape(w.shape[0], -1)[:, :cols]
    codes = q.reshape(w.shape[0], -1)[:, :cols]
    qt = QuantizedTensor(q=codes, scale=scale[..., 0], zero=best_zero[..., 0], group_size=gs, fmt=fmt)
    return deq.to(weight.dtype), qt


@dataclass(frozen=True)
class HQQParams:
    lp_norm: float = 0.7  # p of the l_p error (p < 1: sparse outliers tolerated)
    beta: float = 10.0  # initial weight of the half-quadratic coupling
    kappa: float = 1.01  # beta's growth per iteration
    iters: int = 20
    early_stop: bool = True  # stop when the mean absolute error stops falling

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"method.hqq.lp_norm={self.lp_norm}: allowed 0 < lp_norm <= 1")
        if self.iters <= 0:
            raise ValueError(f"method.hqq.iters={self.iters}: allowed a positive integer")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"method.hqq beta={self.beta}, kappa={self.kappa}: allowed beta > 0, kappa >= 1")


@register_method
class HQQ(QuantMethod):
    """Calibration-free zero-point optimization per group (every linear and fused expert)."""

    name = "hqq"
    handles_experts = True
    tensor_types = frozenset({"W", "W+KV"})
    Params = HQQParams
    lp_norm: float
    beta: float
    kappa: float
    iters: int
    early_stop: bool

    def check_spec(self, spec: QuantSpec) -> None:
        w = spec.w
        if w.format != "int" or w.sym or w.granularity not in ("group", "channel"):
            raise UnsupportedCellError(
                "hqq optimizes the zero points of an asymmetric integer grid per group or channel "
                f"(quant.w.format=int, quant.w.sym=false); this spec has {w.format}, sym={w.sym}, "
                f"per {w.granularity}"
            )

    def _round(self, weight: torch.Tensor, spec: Any) -> tuple[torch.Tensor, QuantizedTensor]:
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        group = spec.group_size if spec.granularity == "group" else None
        return hqq_quantize(
            weight, fmt, group, self.lp_norm, self.beta, self.kappa, self.iters, self.early_stop
        )  # fmt: skip

    def quantize_weight(self, weight: torch.Tensor, spec: Any) -> tuple[torch.Tensor, QuantizedTensor | None]:
        return self._round(weight, spec)

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any, calib: Any = None
    ) -> WeightResults:
        for experts in find_fused_experts(model):
            module = model.get_submodule(experts.path)
            marks = dict(getattr(module, QUANTIZED_PARAMS_ATTR, None) or {})
            for param in experts.params:
                tensor = getattr(module, param.name)
                rows = as_rows(tensor.data, param.layout)
                deq = torch.stack([self._round(rows[e], spec)[0] for e in range(rows.shape[0])])
                tensor.data = deq if param.layout == "out_in" else deq.transpose(1, 2).contiguous()
                marks[param.name] = f"HQQ per expert ({param.layout})"
            setattr(module, QUANTIZED_PARAMS_ATTR, marks)
        return RoundedOnRead(linears, {}, lambda lin: self._round(lin.weight.data, spec))
