"""Where a cell's work runs: the compute device, the dtype, and where weights and calibration
activations rest while a block is being processed.

Three decisions, made once per cell from what torch sees, and pure enough to test without a GPU:

* :func:`resolve_device` turns ``backend.device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``) into a
  ``torch.device``, refusing (ConfigError naming the key) a device this torch or machine does not
  have, before any model loads;
* :func:`resolve_dtype` turns ``model.dtype=auto`` into float32 on CPU (exact, the default the
  numbers were always computed in) and bfloat16 on a GPU that has it (float16 otherwise);
* :func:`plan_placement` decides whether the model is *resident* on the compute device (it fits
  there with room for a block's work) or *offloaded*: its weights stay in CPU memory, calibration
  moves one decoder block at a time to the compute device (:func:`onloaded`), and whole-model
  forwards (references, static scales, evaluation) stream the blocks through it (:func:`streamed`).  Calibration activations stay
  on the compute device when they fit beside a block, else in CPU memory, moved one batch at a
  time (:class:`Activations`).

On a CPU-only machine the compute device and the home device are the same and every move is a
no-op, so the numbers are exactly those of the old whole-model path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from qeval.config import ConfigError, fail

DEVICE_CHOICES = "cpu, cuda, cuda:<index>, auto (cuda when a GPU is visible, else cpu)"
OFFLOAD_CHOICES = ("auto", "never", "always")
#: what a block's work needs beside the block itself on the compute device: its outputs, a
#: method's working copies (GPTQ's Hessians, OmniQuant's parameters and gradients)
BLOCK_WORK_FACTOR = 3.0
#: the share of the compute device's free memory a plan may fill (the allocator fragments)
USABLE_SHARE = 0.9


def cuda_available() -> bool:
    """Whether this torch was built with CUDA and sees a GPU (indirection for tests)."""
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count() if cuda_available() else 0


def resolve_device(name: str, key: str = "backend.device") -> torch.device:
    """The torch device ``name`` stands for on this machine; ConfigError naming ``key`` for one
    that does not exist here (a CUDA device on a CPU-only torch, a GPU index past the last)."""
    if name == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    check_device_name(name, key)
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not cuda_available():
        cuda = torch.version.cuda
        raise ConfigError(
            f"invalid value {key}={name!r}: this torch ({torch.__version__}"
            f"{f', CUDA {cuda}' if cuda else ', a CPU-only build'}) sees no GPU; use {key}=cpu or {key}=auto"
        )
    if device.index is not None and device.index >= cuda_device_count():
        fail(key, name, f"a GPU index below {cuda_device_count()} (the GPUs this machine has)")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """``model.dtype=auto``: float32 on CPU (the exact default), bfloat16 on a GPU that supports
    it, float16 on one that does not; any other value is kept."""
    if name != "auto":
        return name
    if device.type == "cuda":
        # a machine that plans a cluster's sweep may have no GPU: assume bfloat16 there (every
        # GPU since Ampere has it; set model.dtype=float16 for older ones)
        return "float16" if cuda_available() and not torch.cuda.is_bf16_supported() else "bfloat16"
    return "float32"


def check_device_name(name: str, key: str = "backend.device") -> None:
    """ConfigError naming ``key`` for a value that is no device name at all (whether this
    machine has the device is :func:`resolve_device`'s question, asked where the cell runs)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        fail(key, name, DEVICE_CHOICES)
    if device.type not in ("cpu", "cuda"):
        fail(key, name, DEVICE_CHOICES)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` now (None for the CPU: the memory planner of qeval.memory owns
    RAM, and a CPU cell is always resident)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


@dataclass(frozen=True)
class Placement:
    """Where a cell's model lives and computes (see the module docstring)."""

    compute: torch.device  # where blocks are processed and the model is evaluated
    home: torch.device  # where the weights rest: the compute device when resident, else CPU
    activations: torch.device  # where calibration activations rest between uses
    reason: str = ""  # why offloaded, for the record and the log

    @property
    def resident(self) -> bool:
        return self.home == self.compute

    def as_record(self) -> dict[str, Any]:
        out = {"compute": str(self.compute), "weights": str(self.home), "activations": str(self.activations)}
        if self.reason:
            out["reason"] = self.reason
        return out


def plan_placement(
    compute: torch.device,
    weight_bytes: int,
    block_bytes: int,
    activation_bytes: int,
    free: int | None,
    offload: str = "auto",
) -> Placement:
    """Resident when the whole model and a block's work fit in ``free`` bytes of the compute
    device (or ``offload=never``); otherwise weights at home in CPU memory, one block onloaded at
    a time, and the calibration activations beside it when they fit, else in CPU memory.

    Refuses (ConfigError) ``offload=never`` on a device the model cannot fit, and a device where
    not even one block and one batch of activations fit, naming the numbers."""
    cpu = torch.device("cpu")
    if offload not in OFFLOAD_CHOICES:
        fail("backend.offload", offload, "one of " + ", ".join(OFFLOAD_CHOICES))
    if compute.type == "cpu" or free is None:
        return Placement(compute, compute, compute)
    usable = int(free * USABLE_SHARE)
    work = int(block_bytes * BLOCK_WORK_FACTOR)
    gib = 2**30
    if weight_bytes + work + activation_bytes <= usable and offload != "always":
        return Placement(compute, compute, compute)
    if offload == "never":
        raise ConfigError(
            f"invalid value backend.offload=never: the model ({weight_bytes / gib:.1f} GiB) and a block's work "
            f"({(work + activation_bytes) / gib:.1f} GiB) do not fit the {usable / gib:.1f} GiB usable on {compute}; "
            "use backend.offload=auto (one block at a time on the GPU, the rest in CPU memory)"
        )
    if block_bytes + work > usable:
        raise ConfigError(
            f"one decoder block ({block_bytes / gib:.2f} GiB, {(block_bytes + work) / gib:.2f} GiB with its work) "
            f"does not fit the {usable / gib:.1f} GiB usable on {compute}: use a larger device or backend.device=cpu"
        )
    why = (
        "asked (backend.offload=always)"
        if offload == "always"
        else (f"the model ({weight_bytes / gib:.1f} GiB) does not fit the {usable / gib:.1f} GiB usable on {compute}")
    )
    beside = activation_bytes + block_bytes + work <= usable
    return Placement(compute, cpu, compute if beside else cpu, reason=why)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def move(module: nn.Module, device: torch.device) -> None:
    """Move a module's parameters and buffers (the one place qeval moves a block; tests spy on it)."""
    if module_device(module) != device:
        module.to(device)


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """``module`` on ``device`` for the body, back where it was afterwards (no-op for ``None``
    or the device it is already on)."""
    home = module_device(module)
    if device is None or device == home:
        yield module
        return
    move(module, device)
    try:
        yield module
    finally:
        move(module, home)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (tuples, lists, dicts: a block's keyword arguments,
    rotary embeddings among them; the tensor fields of a dataclass: a QuantizedTensor's codes
    and scales) on ``device``; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # QuantizedTensor: codes, scales
        moved = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return dataclasses.replace(
            value, **{k: to_device(v, device) for k, v in moved.items() if isinstance(v, torch.Tensor)}
        )
    return value


class Activations(Sequence[torch.Tensor]):
    """Calibration activations (one tensor per batch) kept on ``store`` and handed out on
    ``compute``, one at a time: a method iterating over them never holds more than one batch on
    the compute device when they are offloaded."""

    def __init__(self, tensors: Sequence[torch.Tensor], compute: torch.device, store: torch.device) -> None:
        self.compute, self.store = compute, store
        self._tensors = [t.to(store) for t in tensors]

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...
    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [t.to(self.compute) for t in self._tensors[index]]
        return self._tensors[index].to(self.compute)

    def __len__(self) -> int:
        return len(self._tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors)


_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("qeval_placement", default=None)


@contextlib.contextmanager
def placed_as(placement: Placement | None) -> Iterator[None]:
    """Calibration inside the body follows ``placement`` (None: wherever the model is).  A
    context rather than an argument of every method: a method need not know where it runs."""
    token = _PLACEMENT.set(placement)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def current_placement(model: nn.Module) -> Placement:
    """The placement set by :func:`placed_as`, else everything where the model is."""
    placement = _PLACEMENT.get()
    if placement is not None:
        return placement
    device = module_device(model)
    return Placement(device, device, device)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: the adapter table's when the family is in it, else the
    modules of the classes transformers never splits across devices (``_no_split_modules``)."""
    from qeval.models.adapters import ADAPTERS

    adapter = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", "") or "")
    if adapter is not None:
        return list(adapter.get_blocks(model))
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in classes]


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers a module holds itself (not its children's); ties kept,
    since a tied Parameter object is moved in place."""
    for p in module.parameters(recurse=False):
        if p.device != device:
            p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        if b is not None and b.device != device:
            module._buffers[name] = b.to(device)


@contextlib.contextmanager
def streamed(model: nn.Module, placement: Placement) -> Iterator[nn.Module]:
    """Whole-model forwards of an offloaded model: everything outside the decoder blocks
    (embeddings, final norm, head: small beside the blocks) on the compute device, and each
    block moved there as it is called and back home when it returns, so the compute device
    holds one block at a time.  No-op for a resident placement."""
    if placement.resident:
        yield model
        return
    blocks = decoder_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    for module in outside:
        _move_own_tensors(module, placement.compute)

    def onload(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        move(block, placement.compute)
        return to_device(args, placement.compute), to_device(kwargs, placement.compute)

    def offload(block: nn.Module, _args: tuple, output: Any) -> Any:
        move(block, placement.home)
        return output

    handles = [b.register_forward_pre_hook(onload, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(offload) for b in blocks]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            move(block, placement.home)
        for module in outside:
            _move_own_tensors(module, placement.home)


def release_device_memory() -> None:
    """Give freed memory back: Python's cycles first, then the CUDA allocator's cache (so the
    next cell, or a vLLM engine sizing its KV cache from free memory, sees it)."""
    gc.collect()
    if cuda_available():
        torch.cuda.empty_cache()


def watch_gpu_memory(device_name: str) -> torch.device | None:
    """Start measuring the peak GPU memory of a cell on ``device_name`` (None when it does not
    compute on a GPU): the peak-statistics reset that :func:`gpu_peak_gib` reads."""
    device = resolve_device(device_name)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return device


def gpu_peak_gib(device: torch.device) -> float:
    """The most GPU memory torch held on ``device`` since :func:`watch_gpu_memory`, in GiB."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
