"""The ``hf`` backend: the quantized model is evaluated in this process by transformers.

Fake quantization (qeval.quant) runs inside the model's own forward, so any device
torch has works, and every task kind is scored, qeval-native ones included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from qeval.backends.base import Backend, BackendSettings, OpenRequest, register_backend
from qeval.config import check_choice
from qeval.eval.scorer import HFScorer, Scorer
from qeval.models.loading import spread_over_devices

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class HFSettings(BackendSettings):
    name: str = "hf"
    device: str = "cpu"  # the torch device quantization and evaluation run on
    # spread the quantized model over the visible GPUs for evaluation ("auto", "balanced",
    # "sequential"; accelerate's dispatch); quantization runs on `device`
    device_map: str | None = None


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

    @contextlib.contextmanager
    def open(self, request: OpenRequest) -> Iterator[Scorer]:
        if self.settings.device_map:
            request.record["device_map"] = spread_over_devices(request.model, self.settings.device_map)
        yield HFScorer(request.model, request.tokenizer)
