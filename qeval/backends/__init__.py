"""Backends: what runs a quantized model for evaluation (``qeval.backends.base``).

The built-in ones register themselves on import: ``hf`` (transformers in this
process, fake quantization) and ``vllm`` (real kernels on an exported checkpoint).
"""

from __future__ import annotations

from qeval.backends import hf, vllm  # noqa: F401
from qeval.backends.base import BACKENDS, Backend, BackendSettings, OpenRequest, backend_for, register_backend

__all__ = ["BACKENDS", "Backend", "BackendSettings", "OpenRequest", "backend_for", "register_backend"]
