"""The backend protocol: what runs a quantized model for evaluation.

A backend declares, in one class:

* ``Settings``: a frozen dataclass that is also the Hydra schema of ``backend=<name>``;
* ``identity_keys``: the settings that change a cell's numbers (they go into its hash;
  thread counts and memory sizes do not);
* ``task_kinds``: which suite entries it can score (perplexity, lm_eval, native);
* :meth:`Backend.preflight` (refuse a cell that can never run here, before any model
  loads) and :meth:`Backend.check_supported` (skip a cell whose format it cannot run);
* :meth:`Backend.open`: turn the quantized in-memory model into a
  :class:`qeval.eval.scorer.Scorer`.

Evaluation sees only the scorer, never the quantization spec or the backend's
name, so a new backend is one module (with its ``Settings``) registered here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from qeval.config import ConfigError, QuantSpec, check_choice, fail
from qeval.eval.scorer import Scorer
from qeval.placement import OFFLOAD_CHOICES, Placement, check_device_name


@dataclass(frozen=True)
class BackendSettings:
    """Settings every backend has: its name, where quantization runs, torch threads."""

    name: str = ""
    # where the model is quantized (and, on hf, evaluated): cpu, cuda, cuda:<index>, or auto
    # (cuda when a GPU is visible); resolved when the cell is built (qeval.placement)
    device: str = "cpu"
    threads: int | None = None  # null: torch's default (all cores)
    # on a GPU: auto keeps the model resident there when it fits and otherwise leaves the weights
    # in CPU memory, streaming one decoder block at a time through the GPU; never / always force
    # one or the other.  The numbers are the same either way (not part of a cell's identity).
    offload: str = "auto"


@dataclass
class OpenRequest:
    """What :meth:`Backend.open` gets: the quantized model and what an export needs."""

    model: nn.Module
    tokenizer: Any
    spec: QuantSpec
    seed: int
    export_root: Path  # <cache_dir>/exports, for backends that write a checkpoint
    export_name: str  # the cell's folder in it (label and hash)
    calibration: Callable[[], list[torch.Tensor]]
    provenance: dict[str, Any] = field(default_factory=dict)
    # what the backend adds to the cell's record (engine settings, export path, device map, timings)
    record: dict[str, Any] = field(default_factory=dict)
    # where the model computes and rests (qeval.placement); None: wherever the model is
    placement: Placement | None = None


class Backend:
    """Base class of backends; subclasses register with :func:`register_backend`."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BackendSettings]] = BackendSettings
    identity_keys: ClassVar[tuple[str, ...]] = ("name",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"perplexity", "lm_eval", "native"})
    # reads the integer codes of the quantized weights (an exporter); others evaluate the
    # dequantized weights, and the codes — a second copy of every weight — are not kept
    needs_codes: ClassVar[bool] = False

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

    def identity(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.settings)
        return {k: values[k] for k in self.identity_keys}

    def cell_identity(self, spec: QuantSpec) -> dict[str, Any]:
        """The backend's part of a cell's identity: :meth:`identity`, plus whatever a backend
        decides per spec that can move the numbers (the hf backend's scoring path)."""
        return self.identity()

    def validate(self) -> None:
        """Range checks of the settings (ConfigError naming the key)."""
        if self.settings.threads is not None and self.settings.threads <= 0:
            fail("backend.threads", self.settings.threads, "a positive integer or null (all cores)")
        check_choice("backend.offload", self.settings.offload, OFFLOAD_CHOICES)
        check_device_name(self.settings.device)

    def preflight(self, suite_kinds: dict[str, str], suite_name: str) -> None:
        """Refuse, before any model loads, a cell this backend can never run: it is not
        installed, or the suite has entries of a kind it cannot score."""
        self.validate()
        refused: dict[str, list[str]] = {}
        for entry, kind in suite_kinds.items():
            if kind not in self.task_kinds:
                refused.setdefault(kind, []).append(entry)
        if refused:
            parts = "; ".join(f"{kind} entries ({', '.join(names)})" for kind, names in sorted(refused.items()))
            raise ConfigError(
                f"suite {suite_name!r} has {parts} that backend={self.name} cannot score (it scores "
                f"{', '.join(sorted(self.task_kinds))}): drop them with '~suite.tasks.<name>' or use another "
                "suite or backend"
            )

    def needs_calibration(self, spec: QuantSpec) -> bool:
        """Whether opening a model of this spec reads calibration data (then the calibration
        config is part of the cell's identity)."""
        return False

    def check_supported(self, spec: QuantSpec) -> None:
        """Raise UnsupportedCellError (the cell is recorded as skipped) for a spec this backend
        cannot run; no-op by default."""

    def check_model(self, spec: QuantSpec, config: Any) -> None:
        """Like :meth:`check_supported`, for what the model's config decides (its shapes), before
        any weight loads; no-op by default."""

    @contextlib.contextmanager
    def open(self, request: OpenRequest) -> Iterator[Scorer]:
        """Yield a scorer of the quantized model; release whatever it holds on exit."""
        raise NotImplementedError
        yield  # pragma: no cover


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available as ``backend=<cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    if cls.name in BACKENDS:
        raise ValueError(f"backend {cls.name!r} registered twice")
    BACKENDS[cls.name] = cls
    return cls


def backend_for(settings: BackendSettings) -> Backend:
    check_choice("backend.name", settings.name, tuple(sorted(BACKENDS)))
    return BACKENDS[settings.name](settings)
