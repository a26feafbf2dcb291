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

Learnable equivalent transformation (LET) for weight-activation cells is not
implemented yet: OmniQuant here refuses WA cells with a clear message.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qeval.models.adapters import get_adapter
from qeval.quant.calibration import BlockInputs, block_output, run_blockwise
from qeval.quant.formats import QuantFormat, QuantizedTensor, group_view
from qeval.quant.methods import register_method
from qeval.quant.methods.base import QuantMethod


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LWCLinear(nn.Module):
    """A linear whose weight is fake-quantized with learnable clipping factors."""

    def __init__(self, linear: nn.Linear, fmt: QuantFormat, group_size: int, init: float = 4.0) -> None:
        super().__init__()
        if fmt.kind != "int":
            raise ValueError("learnable weight clipping is defined for integer formats")
        self.linear, self.fmt = linear, fmt
        cols = linear.in_features
        self.gs = group_size if 0 < group_size < cols else cols
        self.cols = cols
        grouped = group_view(linear.weight.detach().float(), self.gs)  # [out, groups, gs]
        self.register_buffer("w_grouped", grouped)
        shape = grouped.shape[:2]
        self.gamma = nn.Parameter(torch.full(shape, init))
        self.beta = nn.Parameter(torch.full(shape, init))

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(dequantized weight [out, in], scale [out, groups], zero or None, codes [out, in])."""
        w = self.w_grouped
        fmt = self.fmt
        if fmt.sym:
            hi = torch.sigmoid(self.gamma) * w.abs().amax(dim=-1)
            scale = (hi / fmt.qmax).clamp(min=1e-8)
            codes = torch.clamp(_round_ste(w / scale[..., None]), fmt.qmin, fmt.qmax)
            deq, zero = codes * scale[..., None], None
        else:
            hi = torch.sigmoid(self.gamma) * w.amax(dim=-1).clamp(min=0)
            lo = torch.sigmoid(self.beta) * w.amin(dim=-1).clamp(max=0)
            scale = ((hi - lo) / fmt.qmax).clamp(min=1e-8)
            zero = _round_ste(-lo / scale)
            codes = torch.clamp(_round_ste(w / scale[..., None]) + zero[..., None], 0, fmt.qmax)
            deq = (codes - zero[..., None]) * scale[..., None]
        out = w.shape[0]
        return (deq.reshape(out, -1)[:, :self.cols], scale, zero,
                codes.reshape(out, -1)[:, :self.cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized()[0].to(x.dtype), self.linear.bias)


def _swap(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


@register_method
class OmniQuant(QuantMethod):
    name = "omniquant"
    tensor_types = frozenset({"W", "W+KV"})
    needs_calibration = True

    def __init__(self, epochs: int = 5, lwc_lr: float = 5e-3, init: float = 4.0) -> None:
        self.epochs, self.lwc_lr, self.init = epochs, lwc_lr, init
        self.loss_history: dict[int, list[float]] = {}

    def check_supported(self, tensor_type: str, model_type: str | None = None) -> None:
        if tensor_type.startswith("WA"):
            from qeval.errors import UnsupportedCellError

            raise UnsupportedCellError(
                "method 'omniquant' supports weight-only cells (LWC) here; its learnable equivalent "
                "transformation for weight-activation cells (WA) is not implemented yet")
        super().check_supported(tensor_type, model_type)

    def quantize_weights(self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any,
                         calib: Any = None) -> dict[str, tuple[torch.Tensor, Any]]:
        if spec.granularity == "tensor" or spec.format != "int":
            from qeval.errors import UnsupportedCellError

            raise UnsupportedCellError("omniquant's LWC needs an integer format with per-channel or per-group scales")
        adapter = get_adapter(model, "omniquant")
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        group = spec.group_size if spec.granularity == "group" else -1
        results: dict[str, tuple[torch.Tensor, Any]] = {}

        def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            with torch.no_grad():
                targets = [block_output(block, h, inputs.kwargs) for h in inputs.hidden]
            names = [n for n in adapter.block_linears() if f"{adapter.blocks}.{i}.{n}" in linears]
            originals = {n: block.get_submodule(n) for n in names}
            wrapped = {n: LWCLinear(lin, fmt, group, self.init) for n, lin in originals.items()}
            for n, w in wrapped.items():
                _swap(block, n, w)
            params = [p for w in wrapped.values() for p in (w.gamma, w.beta)]
            opt = torch.optim.AdamW(params, lr=self.lwc_lr, weight_decay=0.0)
            history = []
            with torch.enable_grad():
                for _epoch in range(self.epochs):
                    total = 0.0
                    for h, target in zip(inputs.hidden, targets):
                        loss = F.mse_loss(block_output(block, h, inputs.kwargs), target)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        total += loss.item()
                    history.append(total / len(targets))
            self.loss_history[i] = history
            with torch.no_grad():
                for n, w in wrapped.items():
                    deq, scale, zero, codes = w.quantized()
                    lin = originals[n]
                    lin.weight.data = deq.to(lin.weight.dtype)
                    qt = QuantizedTensor(q=codes, scale=scale, zero=zero, group_size=w.gs, fmt=fmt)
                    results[f"{adapter.blocks}.{i}.{n}"] = (lin.weight.data, qt)
                    _swap(block, n, lin)

        for p in model.parameters():
            p.requires_grad_(False)
        run_blockwise(model, adapter, calib, process_block, desc="omniquant")
        return self.round_remaining(linears, results, spec)
