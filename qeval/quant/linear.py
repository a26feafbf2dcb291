"""Fake-quantized linear layers.

Weights are quantized once, when the layer is built (the dequantized values
replace the float weights, the integer codes and scales are kept for export);
activations are quantized on every call by an :class:`ActivationQuantizer`:
dynamic per-token by default (a fresh scale per token, as vLLM's W8A8 kernels
do), or static per-tensor with a scale observed on calibration data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qeval.quant.formats import (
    NVFP4_TENSOR_DIVISOR,
    QuantFormat,
    QuantizedTensor,
    fake_quantize,
    fake_quantize_per_tensor,
    fake_quantize_with_scale,
    quantize,
)


class ActivationQuantizer(nn.Module):
    """Quantizes the input of a linear layer.

    ``granularity='token'`` (dynamic): one scale per token over the hidden
    dimension (a microscaling format: one per token and block along it; NVFP4 may keep a
    static tensor scale observed in calibration, its block scales still per call).  ``granularity='tensor'``: one scale for the whole tensor, either
    dynamic (recomputed per call) or static (observed during calibration, then
    frozen by :meth:`freeze`).
    """

    obs_min: torch.Tensor  # buffers (registered in __init__): the observed range
    obs_max: torch.Tensor

    def __init__(self, fmt: QuantFormat, granularity: str = "token", dynamic: bool = True) -> None:
        super().__init__()
        self.fmt = fmt
        self.granularity = granularity
        self.dynamic = dynamic
        self.observing = not dynamic
        self.register_buffer("obs_min", torch.tensor(float("inf")))
        self.register_buffer("obs_max", torch.tensor(float("-inf")))
        # buffers (not state: persistent=False), so a frozen static scale moves with the model
        # when it goes to the compute device or is streamed there block by block
        self.scale: torch.Tensor | None
        self.zero: torch.Tensor | None
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("zero", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            if self.granularity == "token":
                return fake_quantize(x, self.fmt, None)
            return fake_quantize_per_tensor(x, self.fmt)
        if self.observing:
            self.obs_min = torch.minimum(self.obs_min, x.detach().min().float())
            self.obs_max = torch.maximum(self.obs_max, x.detach().max().float())
            return x
        assert self.scale is not None, "static activation quantizer used before freeze()"
        if self.fmt.kind == "nvfp4":  # a calibrated tensor scale, block scales per call
            return quantize(x, self.fmt, None, tensor_scale=self.scale).dequantize().to(x.dtype)
        return fake_quantize_with_scale(x, self.fmt, self.scale, self.zero)

    def freeze(self) -> None:
        """End observation: fix the static scale from the observed range."""
        if not torch.isfinite(self.obs_max):
            raise RuntimeError("static activation quantizer saw no calibration data")
        lo, hi = self.obs_min.clamp(max=0), self.obs_max.clamp(min=0)
        if self.fmt.kind == "nvfp4":  # NVFP4's tensor scale (compressed-tensors' input_global_scale)
            self.scale = (torch.maximum(hi, -lo) / NVFP4_TENSOR_DIVISOR).clamp(min=1e-12)
        elif self.fmt.kind != "int":
            self.scale = (torch.maximum(hi, -lo) / self.fmt.fp_max).clamp(min=1e-8)
        elif self.fmt.sym:
            self.scale = (torch.maximum(hi, -lo) / self.fmt.qmax).clamp(min=1e-8)
        else:
            self.scale = ((hi - lo) / self.fmt.qmax).clamp(min=1e-8)
            self.zero = torch.round(-lo / self.scale)
        self.observing = False

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else "static"
        return f"{self.fmt.kind}{self.fmt.bits}, {mode} per-{self.granularity}, sym={self.fmt.sym}"


class QuantLinear(nn.Module):
    """A linear layer whose weight holds dequantized values and whose input is
    optionally transformed and quantized.  ``qweight`` keeps the codes and scales."""

    input_transform: torch.Tensor | None  # a buffer (registered in __init__)

    def __init__(
        self,
        linear: nn.Linear,
        weight: torch.Tensor,
        qweight: QuantizedTensor | None = None,
        input_quantizer: ActivationQuantizer | None = None,
        input_transform: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
        self.bias = linear.bias
        self.qweight = qweight
        self.input_quantizer = input_quantizer
        # an online rotation of the input (QuaRot's Hadamard before down_proj), applied
        # before the input is quantized; the weight already holds the matching W H
        self.register_buffer("input_transform", input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = x @ self.input_transform.to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = (
            "fp"
            if self.qweight is None
            else f"{self.qweight.fmt.kind}{self.qweight.fmt.bits} g{self.qweight.group_size}"
        )
        return f"in={self.in_features}, out={self.out_features}, weight={w}"


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` under ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def drop_codes(model: nn.Module) -> int:
    """Let go of every QuantLinear's integer codes (``qweight``) once nothing will read them (no
    exporter, the quantized-model cache written): they are a second copy of each weight.
    Returns how many were dropped."""
    dropped = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.qweight is not None:
            module.qweight = None
            dropped += 1
    return dropped
