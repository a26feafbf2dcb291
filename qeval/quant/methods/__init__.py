"""Quantization methods: the recipe steps qeval computes itself.

A method is either a function-preserving transform (SmoothQuant, QuaRot) or a
rounding (RTN, GPTQ, AWQ, OmniQuant, HQQ); a cell's ``method`` is a list of them
applied in order (``qeval.quant.recipe``).  Each step declares the tensor types
it supports; a sweep cell asking for anything else is recorded as *skipped* with
the reason instead of crashing the sweep.  Activation and KV quantizers are
installed by :func:`qeval.quant.apply.quantize_model` for every recipe, so a
method only decides the weights (and, for transforms, changes the model first).
"""

from __future__ import annotations

# the built-in methods register themselves on import
from qeval.quant.methods import awq, gptq, hqq, omniquant, quarot, rtn, smoothquant, spinquant  # noqa: F401
from qeval.quant.methods.base import QuantMethod, Step, Transform, UnsupportedCellError
from qeval.quant.methods.registry import ALIASES, METHODS, register_method

__all__ = [
    "ALIASES",
    "METHODS",
    "QuantMethod",
    "Step",
    "Transform",
    "UnsupportedCellError",
    "register_method",
]
