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

Microscaling formats fix their own blocks (the caller's group size is not used):

* ``mxfp4`` / ``mxfp8`` (OCP Microscaling Formats spec v1.0): blocks of 32 consecutive
  values share one E8M0 scale, a power of two chosen from the block's absmax as the spec
  says, ``2^(floor(log2(amax)) - emax_elem)`` (``emax_elem`` 2 for E2M1, 8 for E4M3); the
  elements are E2M1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) or E4M3,
  rounded to nearest (ties to even) and saturated at the element's largest value, so a
  block maximum that is not a power of two times 6 (or 448) is clipped, as the spec's
  floor rule implies.
* ``nvfp4`` (NVIDIA): E2M1 elements in blocks of 16 with a two-level scale: one FP32
  scale per tensor, ``amax(tensor) / (6 * 448)``, and per block an FP8 (E4M3) scale,
  ``amax(block) / 6`` divided by the tensor scale and *rounded to E4M3*, so the block's
  effective scale is ``fp8(amax / 6 / s_tensor) * s_tensor``.
* ``fp8_block`` (DeepSeek-V3): E4M3 with an FP32 scale per 128 x 128 tile of a weight
  (:func:`quantize_blocks_2d`) and per 1 x 128 group of an activation along the hidden
  dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.config import FORMAT_BLOCKS

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_EPS = 1e-8

#: the values of an FP4 E2M1 element (and their negatives): codes 0..7 in order, so a code's
#: parity is its mantissa bit and "ties to even" means "ties to the even code"
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:], strict=False))
#: element type of each format; "int" is the affine integer grid
ELEMENTS = {
    "int": "int",
    "fp8_e4m3": "e4m3",
    "fp8_e5m2": "e5m2",
    "fp8_block": "e4m3",
    "mxfp8": "e4m3",
    "mxfp4": "e2m1",
    "nvfp4": "e2m1",
}
_ELEMENT_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
#: the largest finite element and its exponent (OCP MX's emax_elem)
ELEMENT_MAX = {"e2m1": 6.0, "e4m3": 448.0, "e5m2": 57344.0}
ELEMENT_EMAX = {"e2m1": 2, "e4m3": 8}
#: the block size a format fixes (values per scale along the last dimension; fp8_block's
#: weights use BLOCK x BLOCK tiles)
MX_FORMATS = ("mxfp4", "mxfp8")
E8M0_EXP_RANGE = (-127, 127)  # E8M0 encodes 2^-127 .. 2^127 (0xFF is NaN)
NVFP4_TENSOR_DIVISOR = ELEMENT_MAX["e2m1"] * ELEMENT_MAX["e4m3"]  # 6 * 448


@dataclass(frozen=True)
class QuantFormat:
    """What a number is stored as: ``int`` with ``bits``, an FP8 variant, or a microscaling
    format (``nvfp4``, ``mxfp4``, ``mxfp8``, ``fp8_block``) with its element type and block."""

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
    def element(self) -> str:
        """``int``, ``e2m1``, ``e4m3`` or ``e5m2``."""
        return ELEMENTS[self.kind]

    @property
    def fp_max(self) -> float:
        """The largest finite element of a floating-point format."""
        return ELEMENT_MAX[self.element]

    @property
    def block(self) -> int | None:
        """Values per scale that the format itself fixes (None: the spec's group size)."""
        return FORMAT_BLOCKS.get(self.kind)


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value, ties to even, saturating at +-6 (OCP MX).

    E2M1 keeps one mantissa bit: within a binade [2^e, 2^(e+1)) its values are 2^(e-1) apart
    (0.5 below 2, the subnormal range included), and a code's parity is its step count's, so
    ``torch.round`` (half to even) in those steps rounds ties to the even code (0.25 -> 0,
    0.75 -> 1, 2.5 -> 2, 5 -> 4); no search over the grid."""
    a = v.abs().clamp(max=E2M1_VALUES[-1])
    _mantissa, exponent = torch.frexp(a)  # a = m 2^exponent, m in [0.5, 1)
    step = torch.exp2((exponent - 2).clamp(min=-1).to(a.dtype))
    return torch.copysign(torch.round(a / step) * step, v)


def round_elements(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round already-scaled values to a floating-point format's elements (saturating)."""
    element = fmt.element
    if element == "e2m1":
        return round_e2m1(v)
    limit = ELEMENT_MAX[element]
    return v.clamp(-limit, limit).to(_ELEMENT_DTYPES[element]).to(v.dtype)


def e8m0_scale(amax: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """OCP MX's shared scale: ``2^(floor(log2(amax)) - emax_elem)``, clamped to E8M0's range
    (an all-zero block gets the smallest scale; its elements are zero anyway)."""
    _mantissa, exponent = torch.frexp(amax.float())  # amax = m 2^e with m in [0.5, 1)
    shared = (exponent - 1 - ELEMENT_EMAX[fmt.element]).clamp(*E8M0_EXP_RANGE)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, E8M0_EXP_RANGE[0]))
    return torch.exp2(shared.float())


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor FP32 scale: the tensor's absmax onto 6 x 448 (block scale x element)."""
    return _tensor_scale_of(x.float().abs().amax())


def _tensor_scale_of(absmax: torch.Tensor) -> torch.Tensor:
    return (absmax / NVFP4_TENSOR_DIVISOR).clamp(min=_EPS)


def _float_blocks(
    g: torch.Tensor, fmt: QuantFormat, tensor_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A floating-point format's blocks of the grouped ``g`` ([..., groups, gs]): the rounded
    elements, the stored block scales, the tensor scale (NVFP4: ``g``'s own unless given, from
    its blocks' largest absmax) and the effective scale ([..., groups, 1])."""
    amax = g.abs().amax(dim=-1)
    if fmt.kind == "nvfp4" and tensor_scale is None:
        tensor_scale = _tensor_scale_of(amax.amax())
    scale, tensor_scale = block_scales(amax, fmt, tensor_scale)
    effective = (scale if tensor_scale is None else scale * tensor_scale).unsqueeze(-1)
    return round_elements(_divide(g, effective), fmt), scale, tensor_scale, effective


def nvfp4_block_scale(amax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-block scale, relative to the tensor scale and rounded to FP8 E4M3."""
    relative = (amax.float() / ELEMENT_MAX["e2m1"] / tensor_scale).clamp(max=ELEMENT_MAX["e4m3"])
    return relative.to(torch.float8_e4m3fn).float()


def block_scales(
    amax: torch.Tensor, fmt: QuantFormat, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored scale of each block of a floating-point format from the block's absmax, and
    the tensor scale it is relative to (NVFP4 only).  The *effective* scale a value is divided
    by is ``scale * tensor_scale``."""
    if fmt.kind == "nvfp4":
        assert tensor_scale is not None, "nvfp4 needs its tensor scale"
        return nvfp4_block_scale(amax, tensor_scale), tensor_scale
    if fmt.kind in MX_FORMATS:
        return e8m0_scale(amax, fmt), None
    return (amax.float() / fmt.fp_max).clamp(min=_EPS), None


def _divide(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` where a zero scale (an NVFP4 block whose FP8 scale underflowed) gives 0."""
    return torch.where(scale > 0, x / scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


@dataclass
class QuantizedTensor:
    """Codes with their per-group scale and zero point.

    ``q`` has the shape of the original tensor; ``scale``/``zero`` have shape
    ``[..., n_groups]`` over the last dimension (``[row blocks, n_groups]`` when
    ``block_rows > 1``: fp8_block's tiles).  NVFP4 keeps its FP32 ``tensor_scale``
    beside the FP8-valued block scales.  Kept so that exporters (compressed-tensors)
    can write qeval's own scales.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    fmt: QuantFormat
    tensor_scale: torch.Tensor | None = None
    block_rows: int = 1

    @classmethod
    def from_effective_scales(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        group_size: int,
        fmt: QuantFormat,
        tensor_scale: torch.Tensor | None = None,
        block_rows: int = 1,
    ) -> QuantizedTensor:
        """Codes whose per-(row, group) scales were computed as effective scales (GPTQ's and
        LWC's): NVFP4's back to FP8 block scales over ``tensor_scale``, fp8_block's tiles to
        one row of scales per ``block_rows`` rows."""
        if tensor_scale is not None:
            scale = (scale / tensor_scale).to(torch.float8_e4m3fn).float()
        return cls(q, scale[::block_rows], zero, group_size, fmt, tensor_scale, block_rows)

    def effective_scale(self) -> torch.Tensor:
        """The scale of every element (the shape of ``q``)."""
        scale = _expand_groups(self.scale, self.group_size, self.q.shape[-1])
        if self.block_rows > 1:
            scale = scale.repeat_interleave(self.block_rows, dim=-2)[..., : self.q.shape[-2], :]
        if self.tensor_scale is not None:
            scale = scale * self.tensor_scale
        return scale

    def dequantize(self) -> torch.Tensor:
        scale = self.effective_scale()
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


def quantize(
    x: torch.Tensor, fmt: QuantFormat, group_size: int | None = None, tensor_scale: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantize ``x`` along its last dimension in groups of ``group_size`` (``None``: one group
    per row; a microscaling format uses its own block instead).  ``tensor_scale``: NVFP4's
    per-tensor scale when it comes from a larger tensor than ``x`` (GPTQ's column groups);
    by default it is ``x``'s own.  Computes in float32."""
    n = x.shape[-1]
    gs = _group_size(fmt, group_size, n)
    xf = x.float()
    g = group_view(xf, gs)
    zero = None
    if fmt.kind != "int":
        q, scale, tensor_scale, _ = _float_blocks(g, fmt, tensor_scale)
    elif fmt.sym:
        scale = (g.abs().amax(dim=-1) / fmt.qmax).clamp(min=_EPS)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), fmt.qmin, fmt.qmax)
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / fmt.qmax).clamp(min=_EPS)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, fmt.qmax)
    q = q.reshape(*xf.shape[:-1], -1)[..., :n]
    return QuantizedTensor(q=q, scale=scale, zero=zero, group_size=gs, fmt=fmt, tensor_scale=tensor_scale)


def quantize_blocks_2d(w: torch.Tensor, fmt: QuantFormat, block: int | None = None) -> QuantizedTensor:
    """Quantize a ``[rows, cols]`` weight with one scale per ``block x block`` tile (DeepSeek-V3's
    FP8 weights: 128 x 128); partial tiles at the edges get their own scale."""
    edge = block or fmt.block or 128
    rows, cols = w.shape
    wf = w.float()
    per_row = group_view(wf.abs(), edge).amax(dim=-1)  # [rows, col groups]
    amax = group_view(per_row.T, edge).amax(dim=-1).T  # [row blocks, col groups]
    scale, _ = block_scales(amax, fmt)
    effective = scale.repeat_interleave(edge, dim=0)[:rows].repeat_interleave(edge, dim=1)[:, :cols]
    q = round_elements(_divide(wf, effective), fmt)
    return QuantizedTensor(q=q, scale=scale, zero=None, group_size=edge, fmt=fmt, block_rows=edge)


def column_group_params(
    w: torch.Tensor, fmt: QuantFormat, tensor_scale: torch.Tensor | None = None, block_rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective scale and zero point (``[rows]`` each) of one group of columns ``w``
    (``[rows, group]``), as RTN computes them: GPTQ rounds column by column with these.
    ``block_rows > 1`` shares each scale over tiles of that many rows (fp8_block)."""
    if block_rows > 1:
        amax = group_view(w.float().abs().amax(dim=1), block_rows).amax(dim=-1)  # [row blocks]
        scale, _ = block_scales(amax, fmt)
        return scale.repeat_interleave(block_rows)[: w.shape[0]], None
    if fmt.kind == "nvfp4" and tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(w)
    qt = quantize(w, fmt, w.shape[1], tensor_scale)
    scale = qt.scale[:, 0] if qt.tensor_scale is None else qt.scale[:, 0] * qt.tensor_scale
    return scale, None if qt.zero is None else qt.zero[:, 0]


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, group_size: int | None = None) -> torch.Tensor:
    """Quantize then dequantize along the last dimension; returns ``x``'s dtype."""
    if fmt.kind != "int":
        return _fake_quantize_float(x, fmt, group_size)
    return quantize(x, fmt, group_size).dequantize().to(x.dtype)


def _fake_quantize_float(x: torch.Tensor, fmt: QuantFormat, group_size: int | None) -> torch.Tensor:
    """:func:`quantize` then dequantize for a floating-point format, without materializing the
    codes and the expanded scales (activations are fake-quantized on every call): the same
    numbers, in fewer passes over the tensor."""
    n = x.shape[-1]
    gs = _group_size(fmt, group_size, n)
    q, _, _, effective = _float_blocks(group_view(x.float(), gs), fmt, None)
    deq = q * effective
    return deq.reshape(*x.shape[:-1], -1)[..., :n].to(x.dtype)


def _group_size(fmt: QuantFormat, group_size: int | None, n: int) -> int:
    if fmt.block is not None:
        return min(fmt.block, n)
    return n if group_size is None or group_size <= 0 else min(group_size, n)


def fake_quantize_per_tensor(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return fake_quantize(x.reshape(1, -1), fmt).reshape(x.shape)


def fake_quantize_with_scale(
    x: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Fake-quantize with *given* (static, calibrated, or GPTQ's per-group) parameters; for a
    floating-point format ``scale`` is the effective scale (NVFP4: block x tensor scale)."""
    xf = x.float()
    if fmt.kind != "int":
        return (round_elements(_divide(xf, scale), fmt) * scale).to(x.dtype)
    z = 0 if zero is None else zero
    q = torch.clamp(torch.round(xf / scale) + z, fmt.qmin, fmt.qmax)
    return ((q - z) * scale).to(x.dtype)


def quantize_weight(
    w: torch.Tensor, fmt: QuantFormat, granularity: str, group_size: int
) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """Quantize a ``[out, in]`` weight at the given granularity.

    Returns the dequantized weight (in ``w``'s dtype) and, for per-channel, per-group and
    per-block granularity, the codes with their scales (``None`` per tensor).
    """
    if granularity == "tensor":
        return fake_quantize_per_tensor(w, fmt), None
    if granularity == "block":
        if fmt.kind != "fp8_block":
            raise ValueError(f"granularity 'block' (square tiles) is format fp8_block's, not {fmt.kind}'s")
        qt = quantize_blocks_2d(w, fmt, group_size)
        return qt.dequantize().to(w.dtype), qt
    if granularity not in ("channel", "group"):
        raise ValueError(f"unknown weight granularity {granularity!r}: allowed tensor, channel, group, block")
    qt = quantize(w, fmt, group_size if granularity == "group" else None)
    return qt.dequantize().to(w.dtype), qt
