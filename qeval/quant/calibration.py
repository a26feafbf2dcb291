"""The blockwise calibration engine shared by GPTQ, AWQ, SmoothQuant and OmniQuant.

1. One forward of the full model on the calibration batches, stopped at the
   first decoder block, captures that block's input hidden states; a second
   short forward of one batch records the keyword arguments each block
   receives (attention mask, rotary embeddings: they differ per block in
   Gemma 3, sliding vs global).
2. Blocks are processed in order.  A method's ``process_block`` sees the
   block and its inputs and quantizes the block in place, typically after
   collecting per-linear input statistics with :func:`collect_linear_inputs`.
3. The block's outputs, computed *after* it was quantized, become the next
   block's inputs, so every block is calibrated on what it will really see.

Memory stays bounded by one block's activations for all samples.  Where it runs follows the
cell's :class:`qeval.placement.Placement`: a model resident on the compute device is processed
there; an offloaded one keeps its weights in CPU memory and each block is moved to the compute
device for its turn and back afterwards, with the activations beside it or, when they do not
fit, in CPU memory and moved one batch at a time (:class:`qeval.placement.Activations`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qeval.models.adapters import Adapter
from qeval.placement import Activations, Placement, current_placement, onloaded, streamed, to_device


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    # one [1, seq, hidden] tensor per calibration batch, handed out on the compute device
    hidden: Sequence[torch.Tensor]
    kwargs: dict[str, Any]  # what the block receives besides hidden states (on the compute device)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], placement: Placement | None = None
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs of block 0 for every batch, and each block's keyword arguments, computed on the
    placement's compute device (an offloaded model streamed through it one block at a time)."""
    placement = placement or current_placement(model)
    with streamed(model, placement):
        return _capture(model, adapter, [b.to(placement.compute) for b in batches])


def _capture(
    model: nn.Module, adapter: Adapter, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    blocks = adapter.get_blocks(model)
    hidden: list[torch.Tensor] = []

    def grab_hidden(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab_hidden, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()

    per_block: list[dict[str, Any]] = [{} for _ in blocks]

    def make_recorder(i: int) -> Callable:
        def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            per_block[i] = {
                k: v
                for k, v in kwargs.items()
                if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")
            }
            if i == len(blocks) - 1:
                raise _StopForward

        return record

    handles = [b.register_forward_pre_hook(make_recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(batches[0], use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return hidden, per_block


@torch.no_grad()
def collect_linear_inputs(
    block: nn.Module, names: Iterable[str], inputs: BlockInputs, on_input: Callable[[str, torch.Tensor], None]
) -> None:
    """Run the block on every input, handing each named linear's input to ``on_input``.

    Statistics are accumulated by the callback (a Hessian, channel maxima...), so
    no activation is kept beyond one batch.  The forward stops as soon as every
    named linear has seen its input: collecting q/k/v inputs costs one norm, not a
    whole block, which matters for GPTQ's stage-by-stage collection.
    """
    wanted = set(names)
    seen: set[str] = set()

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            on_input(name, args[0].detach())
            seen.add(name)
            if seen == wanted:
                raise _StopForward

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in wanted]
    try:
        for h in inputs.hidden:
            seen.clear()
            try:
                block_output(block, h, inputs.kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    adapter: Adapter,
    batches: list[torch.Tensor],
    process_block: Callable[[int, nn.Module, BlockInputs], None],
    desc: str = "calibrating",
) -> None:
    """Calibrate block by block; each block sees the outputs of the quantized blocks before it.

    Each block is on the compute device for its turn only (a no-op when the model is resident
    there); the activations rest where the placement says."""
    placement = current_placement(model)
    captured, per_block_kwargs = capture_block_inputs(model, adapter, batches, placement)
    hidden = Activations(captured, placement.compute, placement.activations)
    del captured
    blocks = adapter.get_blocks(model)
    for i, block in enumerate(tqdm(blocks, desc=desc)):
        with onloaded(block, placement.compute):
            inputs = BlockInputs(hidden, to_device(per_block_kwargs[i], placement.compute))
            process_block(i, block, inputs)
            # each output goes where the activations rest as soon as it exists: never all of
            # them on the compute device at once when they are offloaded
            outputs = [block_output(block, h, inputs.kwargs).to(placement.activations) for h in hidden]
            hidden = Activations(outputs, placement.compute, placement.activations)
            del outputs
