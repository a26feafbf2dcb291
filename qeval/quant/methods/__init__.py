"""Registry of quantization methods.

A method turns float weights into quantized ones for a given spec, possibly
using calibration data.  Each method declares the tensor types it supports;
a sweep cell asking for anything else is recorded as *skipped* with the
reason instead of crashing the sweep.  Activation and KV quantizers are
installed by :func:`qeval.quant.apply.quantize_model` for every method, so a
method only has to decide the weights (and, for methods such as SmoothQuant,
transform the model before that).
"""

from __future__ import annotations

from typing import Any

from qeval.quant.methods.base import QuantMethod, UnsupportedCellError

METHODS: dict[str, type[QuantMethod]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    """Class decorator: make a method available as ``method=<cls.name>``."""
    if cls.name in METHODS:
        raise ValueError(f"quantization method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, params: dict[str, Any] | None = None) -> QuantMethod:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}: available {', '.join(sorted(METHODS))}")
    return METHODS[name](**(params or {}))


# built-in methods register themselves on import
from qeval.quant.methods import awq, gptq, omniquant, quarot, rtn, smoothquant  # noqa: E402,F401

__all__ = ["METHODS", "QuantMethod", "UnsupportedCellError", "get_method", "register_method"]
