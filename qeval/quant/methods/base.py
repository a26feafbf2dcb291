"""The interface every quantization method implements."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from qeval.errors import UnsupportedCellError

__all__ = ["QuantMethod", "UnsupportedCellError"]


class QuantMethod:
    """Base class: decides quantized weights for the linears of a model.

    Subclasses set ``name`` and ``tensor_types`` and implement
    :meth:`quantize_weight`; methods that need the whole model at once
    (calibrated, blockwise) override :meth:`quantize_weights`.
    """

    name: ClassVar[str] = ""
    tensor_types: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"method {self.name!r} takes no parameters, got {sorted(params)}")

    def check_supported(self, tensor_type: str, model_type: str | None = None) -> None:
        if tensor_type not in self.tensor_types and tensor_type != "FP":
            raise UnsupportedCellError(
                f"method {self.name!r} does not support tensor type {tensor_type} "
                f"(supports {', '.join(sorted(self.tensor_types))})"
            )

    def prepare(self, spec: Any) -> None:
        """See the whole cell spec before quantizing (e.g. OmniQuant trains LET only
        when activations are quantized).  No-op by default."""

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any, calib: Any = None
    ) -> dict[str, tuple[torch.Tensor, Any]]:
        """Return ``{name: (dequantized weight, QuantizedTensor | None)}``."""
        return {name: self.quantize_weight(lin.weight.data, spec) for name, lin in linears.items()}

    def quantize_weight(self, weight: torch.Tensor, spec: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    @staticmethod
    def round_remaining(
        linears: dict[str, nn.Linear], results: dict[str, tuple[torch.Tensor, Any]], spec: Any
    ) -> dict[str, tuple[torch.Tensor, Any]]:
        """RTN for the target linears a blockwise method did not visit (outside the
        decoder blocks, e.g. a quantized lm_head)."""
        from qeval.quant.formats import QuantFormat, quantize_weight

        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        for name, lin in linears.items():
            if name not in results:
                results[name] = quantize_weight(lin.weight.data, fmt, spec.granularity, spec.group_size)
        return results
