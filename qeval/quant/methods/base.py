"""The two kinds of recipe step every quantization method is.

* A :class:`Transform` changes the model without changing its function in full
  precision (SmoothQuant's scaling, a rotation): it prepares weights and
  activations for rounding.
* A :class:`QuantMethod` (a rounding) decides the quantized weights of the target
  linears (RTN, GPTQ, AWQ's scale-and-clip search, OmniQuant's learned clipping).

A recipe (``qeval.quant.recipe``) is any number of transforms followed by at most
one rounding (RTN when none is given).  Each step declares its parameters as a
frozen dataclass (``Params``), which is also the Hydra schema of ``method=<name>``,
so defaults live in one place and an unknown parameter is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qeval.config import QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import adapter_for, folding_adapter
from qeval.quant.formats import QuantFormat, QuantizedTensor, quantize_weight

__all__ = ["NoParams", "QuantMethod", "Step", "Transform", "UnsupportedCellError"]

# {linear name: (dequantized weight, codes and scales or None when not representable)}
WeightResults = Mapping[str, tuple[torch.Tensor, QuantizedTensor | None]]


@dataclass(frozen=True)
class NoParams:
    """The parameters of a step that takes none."""


class Step:
    """A recipe step: a name, its kind, its typed parameters and the tensor types it supports.

    The parameters are set as attributes too (``self.damp``), so method code reads them
    directly; ``self.params`` is the dataclass, which the cell's identity is made of.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    tensor_types: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False
    # reads the architecture adapter table (blockwise calibration, scale folding, rotation)
    uses_adapter: ClassVar[bool] = False
    # folds scales into the norms before linears, or rotates through them (needs Adapter.foldable)
    folds_scales: ClassVar[bool] = False
    # quantizes (rounding) or transforms (transform) the fused expert tensors of MoE blocks too;
    # a recipe with a step that does not is refused on MoE models (qeval.quant.apply)
    handles_experts: ClassVar[bool] = False

    def __init__(self, params: Any = None, **overrides: Any) -> None:
        if params is None:
            try:
                params = self.Params(**overrides)
            except TypeError as err:
                known = [f.name for f in dataclasses.fields(self.Params)]
                raise TypeError(
                    f"method {self.name!r} takes {', '.join(known) if known else 'no parameters'}, "
                    f"got {sorted(overrides)}"
                ) from err
        elif overrides:
            params = dataclasses.replace(params, **overrides)
        self.params = params
        for f in dataclasses.fields(params):
            setattr(self, f.name, getattr(params, f.name))

    def check_supported(self, tensor_type: str, model_type: str | None = None) -> None:
        if tensor_type not in self.tensor_types and tensor_type != "FP":
            raise UnsupportedCellError(
                f"method {self.name!r} does not support tensor type {tensor_type} "
                f"(supports {', '.join(sorted(self.tensor_types))})"
            )

    def check_spec(self, spec: Any) -> None:
        """Refuse (UnsupportedCellError) a quantization spec this step cannot apply (a format,
        a symmetry, a granularity), from the spec alone: before any weight loads."""

    def why_not_experts(self, spec: Any) -> str:
        """Why this step cannot handle fused MoE experts in a cell of ``spec`` ("": it can)."""
        return "" if self.handles_experts else f"{self.name} does not handle fused expert tensors"

    def check_architecture(self, model_type: str | None) -> None:
        """Refuse (UnsupportedCellError), from the model type alone, an architecture this step
        cannot handle, so that the cell is skipped before any weight loads."""
        if self.uses_adapter and model_type is not None:
            (folding_adapter if self.folds_scales else adapter_for)(model_type, self.name)

    def identity(self) -> dict[str, Any]:
        """What of this step changes numbers: its name and every parameter."""
        return {"name": self.name, "params": dataclasses.asdict(self.params)}


class Transform(Step):
    """A function-preserving change of the model, applied before rounding."""

    kind = "transform"

    def apply(self, model: nn.Module, spec: QuantSpec, calib: list[torch.Tensor] | None) -> None:
        raise NotImplementedError


class QuantMethod(Step):
    """A rounding: decides quantized weights for the target linears of a model.

    Subclasses implement :meth:`quantize_weight`; methods that need the whole model at
    once (calibrated, blockwise) override :meth:`quantize_weights`.
    """

    kind = "rounding"

    def prepare(self, spec: QuantSpec) -> None:
        """See the whole cell spec before quantizing (e.g. OmniQuant trains LET only
        when activations are quantized).  No-op by default."""

    # keep the integer codes beside the dequantized weights (an exporter or the quantized-model
    # cache reads them); set by quantize_model.  Without them a quantized model costs one copy
    keep_codes: bool = True

    def quantize_weights(
        self, model: nn.Module, linears: dict[str, nn.Linear], spec: WeightSpec, calib: Any = None
    ) -> WeightResults:
        """Return ``{name: (dequantized weight, QuantizedTensor | None)}`` — computed as it is
        read (:class:`RoundedOnRead`), so that a model is never held twice."""
        return RoundedOnRead(linears, {}, lambda lin: self.quantize_weight(lin.weight.data, spec))

    def quantize_weight(self, weight: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, QuantizedTensor | None]:
        raise NotImplementedError

    @staticmethod
    def round_remaining(linears: dict[str, nn.Linear], results: WeightResults, spec: WeightSpec) -> WeightResults:
        """RTN for the target linears a blockwise method did not visit (outside the
        decoder blocks, e.g. a quantized lm_head), computed as each is read."""
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        return RoundedOnRead(
            linears, dict(results), lambda lin: quantize_weight(lin.weight.data, fmt, spec.granularity, spec.group_size)
        )


class RoundedOnRead(Mapping[str, tuple[torch.Tensor, "QuantizedTensor | None"]]):
    """The weights of a rounding, by linear name: those the method already decided
    (``decided``), the others rounded by ``rounding(linear)`` when read.

    quantize_model reads each name once and replaces that linear right away, so the original
    weight is freed as its rounded copy appears: one extra layer at a time, never a second
    model."""

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        decided: dict[str, tuple[torch.Tensor, QuantizedTensor | None]],
        rounding: Callable[[nn.Linear], tuple[torch.Tensor, QuantizedTensor | None]],
    ) -> None:
        self._linears, self._decided, self._rounding = linears, decided, rounding
        self._names = list(linears)

    def __getitem__(self, name: str) -> tuple[torch.Tensor, QuantizedTensor | None]:
        if name in self._decided:
            return self._decided[name]
        if name not in self._linears:
            raise KeyError(name)
        return self._rounding(self._linears[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
