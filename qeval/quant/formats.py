"""Quantization primitives: pure tensor functions, no modules, no state.

Every granularity is expressed as "reduce over the last dimension in groups":

* per-tensor: the tensor is flattened to one row, one group;
* per-channel (weights ``[out, in]``) and per-token (activations ``[..., hidden]``):
  one group spanning the whole last dimension;
* per-group: groups of ``group_size`` consecutive elements of the last
  dimension.  When ``group_size`` does not divide the dimension (SmolLM2's
  hidden size 576 with groups of 128), the last group is *partial*
  (here 64 wide) and gets its own scale, exactly as GPTQ's column groups do,
  so ``w4g128`` means the same thing on every model.

Integer formats are affine: ``q = clamp(round(x / scale) + zero, qmin, qmax)``
and ``x_hat = (q - zero) * scale``.  Symmetric formats have ``zero = 0`` and a
signed range ``[-2^(b-1), 2^(b-1) - 1]`` with ``scale = absmax / (2^(b-1) - 1)``;
asymmetric ones use ``[0, 2^b - 1]`` over a range that always contains 0
(so that zero padding and ReLU zeros stay exact).  FP8 formats scale the
group's absmax onto the format's largest finite value and round through
torch's float8 dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_EPS = 1e-8


@dataclass(frozen=True)
class QuantFormat:
    """What a number is stored as: ``int`` with ``bits`` or an FP8 variant."""

    bits: int = 8
    kind: str = "int"
    sym: bool = True

    @property
    def qmin(self) -> int:
        if self.kind != "int":
            raise ValueError("qmin is defined for integer formats only")
        return -(2 ** (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        if self.kind != "int":
            raise ValueError("qmax is defined for integer formats only")
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1

    @property
    def fp_max(self) -> float:
        return float(torch.finfo(FP8_DTYPES[self.kind]).max)


@dataclass
class QuantizedTensor:
    """Integer codes with their per-group scale and zero point.

    ``q`` has the shape of the original tensor; ``scale``/``zero`` have shape
    ``[..., n_groups]`` over the last dimension.  Kept so that exporters
    (compressed-tensors) can write qeval's own scales later.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    fmt: QuantFormat

    def dequantize(self) -> torch.Tensor:
        scale = _expand_groups(self.scale, self.group_size, self.q.shape[-1])
        if self.fmt.kind != "int":
            return self.q * scale
        zero = 0 if self.zero is None else _expand_groups(self.zero, self.group_size, self.q.shape[-1])
        return (self.q - zero) * scale


def _expand_groups(t: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=-1)[..., :n]


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``x`` as ``[..., n_groups, group_size]``; a partial last group is padded
    by repeating its last element, which leaves its min and max unchanged."""
    n = x.shape[-1]
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], n_groups, group_size)


def quantize(x: torch.Tensor, fmt: QuantFormat, group_size: int | None = None) -> QuantizedTensor:
    """Quantize ``x`` along its last dimension in groups of ``group_size``
    (``None``: one group per row).  Computes in float32."""
    n = x.shape[-1]
    gs = n if group_size is None or group_size <= 0 else min(group_size, n)
    xf = x.float()
    g = group_view(xf, gs)
    if fmt.kind in FP8_DTYPES:
        scale = (g.abs().amax(dim=-1) / fmt.fp_max).clamp(min=_EPS)
        q = (g / scale.unsqueeze(-1)).clamp(-fmt.fp_max, fmt.fp_max).to(FP8_DTYPES[fmt.kind]).float()
        zero = None
    elif fmt.sym:
        scale = (g.abs().amax(dim=-1) / fmt.qmax).clamp(min=_EPS)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), fmt.qmin, fmt.qmax)
        zero = None
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / fmt.qmax).clamp(min=_EPS)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, fmt.qmax)
    q = q.reshape(*xf.shape[:-1], -1)[..., :n]
    return QuantizedTensor(q=q, scale=scale, zero=zero, group_size=gs, fmt=fmt)


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, group_size: int | None = None) -> torch.Tensor:
    """Quantize then dequantize along the last dimension; returns ``x``'s dtype."""
    return quantize(x, fmt, group_size).dequantize().to(x.dtype)


def fake_quantize_per_tensor(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return fake_quantize(x.reshape(1, -1), fmt).reshape(x.shape)


def fake_quantize_with_scale(
    x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Fake-quantize with *given* (static, calibrated) parameters."""
    xf = x.float()
    if fmt.kind in FP8_DTYPES:
        q = (xf / scale).clamp(-fmt.fp_max, fmt.fp_max).to(FP8_DTYPES[fmt.kind]).float()
        return (q * scale).to(x.dtype)
    z = 0 if zero is None else zero
    q = torch.clamp(torch.round(xf / scale) + z, fmt.qmin, fmt.qmax)
    return ((q - z) * scale).to(x.dtype)


def quantize_weight(
    w: torch.Tensor, fmt: QuantFormat, granularity: str, group_size: int
) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """Quantize a ``[out, in]`` weight at the given granularity.

    Returns the dequantized weight (in ``w``'s dtype) and, for per-channel and
    per-group granularity, the codes with their scales (``None`` per tensor).
    """
    if granularity == "tensor":
        return fake_quantize_per_tensor(w, fmt), None
    if granularity not in ("channel", "group"):
        raise ValueError(f"unknown weight granularity {granularity!r}: allowed tensor, channel, group")
    qt = quantize(w, fmt, group_size if granularity == "group" else None)
    return qt.dequantize().to(w.dtype), qt
