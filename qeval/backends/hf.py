"""The ``hf`` backend: the quantized model is evaluated in this process by transformers.

Fake quantization (qeval.quant) runs inside the model's own forward, so any device
torch has works, and every task kind is scored, qeval-native ones included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from qeval.backends.base import Backend, BackendSettings, OpenRequest, register_backend
from qeval.config import QuantSpec, check_choice
from qeval.eval.scorer import HFScorer, Scorer, shared_context_allowed
from qeval.placement import current_placement, streamed


def spread_over_devices(model: nn.Module, device_map: str) -> dict[str, Any]:
    """Dispatch ``model`` over the visible accelerators with accelerate (for models larger
    than one GPU); returns the module -> device map it used.

    Decoder blocks are never split (the model's ``_no_split_modules``), so a block's
    fake-quant ops run on the device that holds its weights.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
        )
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=placement)
    return {name: str(device) for name, device in placement.items()}


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class HFSettings(BackendSettings):
    name: str = "hf"
    device: str = "cpu"  # the torch device quantization and evaluation run on (cpu, cuda, cuda:N, auto)
    # spread the quantized model over the visible GPUs for evaluation ("auto", "balanced",
    # "sequential"; accelerate's dispatch); quantization runs on `device`
    device_map: str | None = None
    # score the multiple-choice requests that share a context with the context computed once
    # (qeval.eval.shared_context; same numbers as lm-eval's HFLM), where the spec allows it;
    # false: always lm-eval's HFLM.  A cell scored with shared contexts has it in its identity
    # (HFBackend.cell_identity): float32 rounding noise moves a quantized model's numbers slightly.
    shared_context: bool = True


@register_backend
class HFBackend(Backend):
    name = "hf"
    Settings = HFSettings
    identity_keys = ("name", "device")
    settings: HFSettings

    def validate(self) -> None:
        super().validate()
        if self.settings.device_map is not None:
            check_choice("backend.device_map", self.settings.device_map, DEVICE_MAPS)

    def scoring(self, spec: QuantSpec) -> tuple[bool, str]:
        """Whether lm-eval's log-likelihood requests are scored with shared contexts under
        ``spec``, and the reason when not."""
        if not self.settings.shared_context:
            return False, "backend.shared_context=false"
        return shared_context_allowed(spec)

    def cell_identity(self, spec: QuantSpec) -> dict[str, Any]:
        """Shared-context scoring computes the same function as HFLM, but in float32 a quantized
        spec's log-likelihoods move by rounding noise (as they do with HFLM's batch size), so a
        cell scored that way is a different cell: ``scoring`` is in its identity.  Cells that
        keep HFLM keep the identity they always had."""
        identity = self.identity()
        if self.scoring(spec)[0]:
            identity["scoring"] = "shared-context"
        return identity

    @contextlib.contextmanager
    def open(self, request: OpenRequest) -> Iterator[Scorer]:
        """A scorer of the in-memory model: spread over the GPUs by accelerate (``device_map``),
        resident on the compute device, or, offloaded, streamed through it one block at a time."""
        shared, reason = self.scoring(request.spec)
        # which scorer lm-eval's log-likelihood requests met, and why not the faster one
        request.record["lm_eval_scoring"] = "shared-context" if shared else f"hflm ({reason})"
        if self.settings.device_map:
            request.record["device_map"] = spread_over_devices(request.model, self.settings.device_map)
            yield HFScorer(request.model, request.tokenizer, shared_context=shared)
            return
        placement = request.placement or current_placement(request.model)
        with streamed(request.model, placement):
            yield HFScorer(request.model, request.tokenizer, shared_context=shared)
