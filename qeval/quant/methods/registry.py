"""The registry of recipe steps (quantization methods), by name.

Built-in methods register themselves when ``qeval.quant.methods`` is imported;
a researcher's own method registers the same way from a file named in
``methods.include=[...]`` (see ``qeval.cli``), without forking qeval.
"""

from __future__ import annotations

from qeval.quant.methods.base import Step

METHODS: dict[str, type[Step]] = {}

# names kept from before recipes composed: each is the recipe it always was
ALIASES: dict[str, tuple[str, ...]] = {"quarot_gptq": ("quarot", "gptq")}


def register_method(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step available as ``method=<cls.name>``."""
    if not cls.name or cls.kind not in ("transform", "rounding"):
        raise ValueError(f"{cls.__name__} needs a name and kind 'transform' or 'rounding' to be registered")
    if cls.name in METHODS or cls.name in ALIASES:
        raise ValueError(f"quantization method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls
