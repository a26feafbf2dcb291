"""Round-to-nearest: each weight group gets min/max (or absmax) scales and is
rounded independently.  The baseline every calibrated method must beat."""

from __future__ import annotations

from typing import Any

import torch

from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.methods.base import QuantMethod
from qeval.quant.methods.registry import register_method


@register_method
class RTN(QuantMethod):
    name = "rtn"
    handles_experts = True
    tensor_types = frozenset({"W", "WA", "KV", "W+KV", "WA+KV"})

    def quantize_weight(self, weight: torch.Tensor, spec: Any) -> tuple[torch.Tensor, Any]:
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        return quantize_weight(weight, fmt, spec.granularity, spec.group_size)
