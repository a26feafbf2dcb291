"""Sizes a user can plan with: a cell's expected peak memory, known before any weight loads.

A sweep holds one copy of the model's weights (qeval.models.loading.LoadedModel), so a cell's
peak is about

    weights + calibration working set + KV cache of the longest sequence
            + the largest evaluation tensors (logits over the vocabulary) + the runtime

Each term comes from the model's config (parameters counted on the meta device: no memory,
no download) and the cell's settings.  The sweep prints the worst cell's estimate before the
first cell runs, and refuses a sweep whose estimate exceeds the memory it can use (the RAM
available, or ``memory_limit_gib``), naming the numbers: better a refusal in seconds than an
out-of-memory kill an hour in.  The estimate is deliberately simple and a little generous;
docs/BENCHMARKS.md compares it with measured peaks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qeval.cell import Cell

log = logging.getLogger(__name__)

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# torch, transformers, lm-eval, datasets and the tokenizer, resident in a cell's process
RUNTIME_BYTES = int(1.5 * GIB)
# a suite entry that does not say how long its sequences are (lm-eval tasks): assume this many
DEFAULT_TOKENS = 2048


class SweepTooLarge(Exception):
    """The sweep cannot fit in the memory it may use (a refusal, before anything runs)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """A cell's expected peak, in bytes, by what holds it."""

    weights: int
    calibration: int
    kv: int
    activations: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.calibration + self.kv + self.activations + self.runtime

    def describe(self) -> str:
        parts = [
            f"{name} {_gib(getattr(self, name))}" for name in ("weights", "calibration", "kv", "activations", "runtime")
        ]
        return f"{_gib(self.total)} ({' + '.join(parts)})"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory);
    tied embeddings once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def estimate(cell: Cell, config: Any, params: int | None = None) -> MemoryEstimate:
    """The expected peak of ``cell`` on a model with ``config`` (``params``: its parameter
    count, when already known)."""
    text = _text_config(config)
    width = DTYPE_BYTES.get(cell.model.dtype, 4)
    params = parameter_count(config) if params is None else params
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", 0) or 0
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0) or 0
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    vocab = getattr(text, "vocab_size", 0) or 0
    tokens = max([_tokens(task) for task in cell.suite.tasks.values()] or [DEFAULT_TOKENS])
    calibration = 0
    if cell.uses_calibration:
        # a block's inputs and outputs for every calibration window (fp32), and the largest
        # Hessian (GPTQ: in_features squared) with its inverse
        calibration = 2 * cell.calib.nsamples * cell.calib.seqlen * hidden * 4 + 2 * max(hidden, inter) ** 2 * 4
    kv = 2 * layers * kv_heads * head_dim * tokens * width
    # the logits of one window over the vocabulary in fp32, their log-softmax, and the cached
    # FP reference being compared with
    activations = 3 * tokens * vocab * 4 + tokens * inter * 4
    return MemoryEstimate(weights=params * width, calibration=calibration, kv=kv, activations=activations)


def _tokens(task: Any) -> int:
    if getattr(task, "kind", "") == "perplexity":
        return int(task.seqlen)
    return DEFAULT_TOKENS


def available_bytes() -> int:
    """The RAM this machine can give a new process now (MemAvailable; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(cells: list[Cell], limit_gib: float | None = None) -> str:
    """Estimate every distinct (model, settings) of a sweep; return the line to print for the
    worst cell, or raise SweepTooLarge naming the numbers when it does not fit ``limit_gib``
    (default: the RAM available now).  Cells whose model config cannot be read without loading
    (a GGUF not yet converted, a Hub model not yet downloaded) are left out, saying so."""
    from qeval.models.loading import peek_config

    limit = int(limit_gib * GIB) if limit_gib is not None else available_bytes()
    where = f"memory_limit_gib={limit_gib}" if limit_gib is not None else "RAM available"
    worst: tuple[MemoryEstimate, Cell] | None = None
    counted: dict[str, int] = {}
    unknown: list[str] = []
    for cell in cells:
        key = repr(dataclasses.asdict(cell.model))
        config = peek_config(cell.model, cell.cache_dir)
        if config is None:
            unknown.append(cell.model.name)
            continue
        if key not in counted:
            counted[key] = parameter_count(config)
        est = estimate(cell, config, counted[key])
        if worst is None or est.total > worst[0].total:
            worst = (est, cell)
    if worst is None:
        return (
            "sweep: peak memory not estimated (no model config readable before loading: "
            + ", ".join(sorted(set(unknown)))
            + ")"
        )
    est, cell = worst
    line = f"sweep: expected peak memory {est.describe()} (cell {cell.label}); {where} {_gib(limit)}"
    if unknown:
        line += f"; not estimated: {', '.join(sorted(set(unknown)))}"
    line += gpu_plan(cell, config, est)
    if est.total > limit:
        raise SweepTooLarge(
            f"cell {cell.label} needs about {est.describe()}, but {where} is {_gib(limit)}: the sweep would run out "
            "of memory. Use a smaller model or dtype (model.dtype=bfloat16), fewer calibration samples "
            "(calib.nsamples, calib.seqlen), shorter windows, or set memory_limit_gib if the estimate is wrong "
            "for this machine; nothing was run"
        )
    return line


def gpu_plan(cell: Cell, config: Any, est: MemoryEstimate) -> str:
    """For a cell that computes on a GPU this machine has: whether the model will be resident
    there or offloaded one block at a time (qeval.placement.plan_placement on the estimate and
    the GPU's free memory), as a clause of the sweep's line; SweepTooLarge, naming the numbers,
    when not even one block fits.  Empty for CPU cells and GPUs this machine does not have (a
    cluster's nodes decide there)."""
    from qeval.config import ConfigError
    from qeval.placement import cuda_available, free_bytes, plan_placement, resolve_device

    if not cell.backend.device.startswith("cuda") or not cuda_available():
        return ""
    device = resolve_device(cell.backend.device)
    layers = getattr(_text_config(config), "num_hidden_layers", None) or 1
    free = free_bytes(device)
    try:
        placement = plan_placement(
            device, est.weights, est.weights // layers, est.calibration, free, cell.backend.offload
        )
    except ConfigError as err:
        raise SweepTooLarge(f"cell {cell.label}: {err}; nothing was run") from err
    where = "resident" if placement.resident else f"offloaded ({placement.reason}), one block at a time"
    return f"; on {device}: {where}, {_gib(free or 0)} free"
