"""Mixture-of-Experts structure: fused expert tensors and routers, found from the model itself.

In transformers 5 the experts of an MoE block (Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS, …)
are one module holding 3-D parameters, ``experts.gate_up_proj`` ``[experts, …]`` and
``experts.down_proj``, multiplied per expert inside the module's forward; they are not
``nn.Linear`` modules, so "quantize every linear" leaves most of such a model's weights in
full precision.  This module finds them and says how each multiplies its input:

* a fused-experts module is one whose 3-D (or higher) parameters all have the module's
  ``num_experts`` (or the config's expert count) as their first dimension;
* each such parameter's layout is ``"out_in"`` (``F.linear(x, W[e])``: rows are output
  channels, the transformers convention) or ``"in_out"`` (``x @ W[e]``, GPT-OSS), read from
  its shape against the model's hidden size: the input-side projection (the one that reads the
  block's hidden states: ``gate_up_proj``, ``gate_proj``, ``up_proj``, ``w1``, ``w3``) has the
  hidden size as its input dimension, the output-side one (``down_proj``, ``w2``) as its output
  dimension; where the shape alone is ambiguous (intermediate size equal to hidden) the
  module's other projection decides, and failing that the transformers convention;
* a router is the module that scores experts: an ``nn.Linear`` or a module with a 2-D
  ``weight`` whose output size is the expert count, directly inside an MoE block (the module
  that holds the experts), e.g. ``mlp.gate`` / ``mlp.router``.

Weights are then quantized per expert exactly as a linear layer of the same shape would be
(:func:`quantize_experts`): the [experts, out, in] tensor is viewed as experts × out rows of
``in`` columns, so per-channel and per-group codes equal those of an unfused copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.typing_helpers import weight_of

INPUT_SIDE = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3")
OUTPUT_SIDE = ("down_proj", "w2")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
LAYOUTS = ("out_in", "in_out")
# calibration tokens an expert needs for its own statistics (GPTQ's Hessian, AWQ's clip search,
# OmniQuant's clipping); an expert routed fewer is rounded to nearest and counted in the record.
# A constant, not a parameter, so dense cells keep their identity.
MIN_EXPERT_TOKENS = 16


@dataclass(frozen=True)
class ExpertParam:
    """One fused expert tensor: its name inside the experts module and its layout."""

    name: str
    layout: str  # out_in: W[e] is [out, in]; in_out: W[e] is [in, out]
    shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return self.shape[2] if self.layout == "out_in" else self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.layout == "out_in" else self.shape[2]


@dataclass(frozen=True)
class FusedExperts:
    """A module holding every expert of one MoE block as stacked tensors."""

    path: str  # dotted module path from the model root
    num_experts: int
    params: tuple[ExpertParam, ...]


def _config_value(model: nn.Module, keys: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        for key in keys:
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def expert_count(model: nn.Module) -> int | None:
    """The model's routed-expert count from its config (None: not an MoE config)."""
    return _config_value(model, EXPERT_COUNT_KEYS)


def hidden_size(model: nn.Module) -> int | None:
    return _config_value(model, ("hidden_size", "d_model", "n_embd"))


def _layout(name: str, shape: tuple[int, ...], hidden: int | None) -> str | None:
    """The layout the shape implies, or None where it cannot tell."""
    a, b = shape[1], shape[2]
    if hidden is None or a == b:
        return None
    if name in INPUT_SIDE:  # reads the hidden states: its input dimension is the hidden size
        return "out_in" if b == hidden else ("in_out" if a == hidden else None)
    if name in OUTPUT_SIDE:  # writes the hidden states: its output dimension is the hidden size
        return "out_in" if a == hidden else ("in_out" if b == hidden else None)
    return None


def find_fused_experts(model: nn.Module) -> list[FusedExperts]:
    """Every fused-experts module of ``model``, in module order."""
    configured = expert_count(model)
    hidden = hidden_size(model)
    found = []
    for path, module in model.named_modules():
        tensors = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() >= 3}
        if not tensors:
            continue
        count = getattr(module, "num_experts", None) or configured
        if not isinstance(count, int) or any(p.shape[0] != count for p in tensors.values()):
            continue
        layouts = {n: _layout(n, tuple(p.shape), hidden) for n, p in tensors.items()}
        known = {v for v in layouts.values() if v is not None}
        fallback = known.pop() if len(known) == 1 else "out_in"  # the module's own convention
        params = tuple(
            ExpertParam(n, layouts[n] or fallback, tuple(p.shape)) for n, p in tensors.items() if p.dim() == 3
        )
        found.append(FusedExperts(path, count, params))
    return found


def is_router(model: nn.Module, path: str, module: nn.Module, experts: list[FusedExperts] | None = None) -> bool:
    """Whether ``module`` (at ``path``) scores the experts of its MoE block.

    Structure, not names: it sits directly in a module that also holds fused experts (or an
    ``experts`` ModuleList), and its 2-D weight has one output row per expert.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    parent_path = path.rpartition(".")[0]
    experts = find_fused_experts(model) if experts is None else experts
    siblings = [e for e in experts if e.path.rpartition(".")[0] == parent_path]
    if siblings:
        return weight.shape[0] == siblings[0].num_experts
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return False
    listed = getattr(parent, "experts", None)
    return isinstance(listed, nn.ModuleList) and weight.shape[0] == len(listed)


def routers(model: nn.Module, experts: list[FusedExperts] | None = None) -> dict[str, nn.Module]:
    """Every router module of ``model`` by path (empty for a dense model); ``experts``: its
    fused experts when already found."""
    experts = find_fused_experts(model) if experts is None else experts
    return {
        path: module
        for path, module in model.named_modules()
        if path and not list(module.children()) and is_router(model, path, module, experts)
    }


def as_rows(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """[experts, out, in] view of a fused tensor (a transposed copy for ``in_out``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: allowed {', '.join(LAYOUTS)}")
    return weight if layout == "out_in" else weight.transpose(1, 2)


def expert_input_rows(module: nn.Module, experts: FusedExperts) -> torch.Tensor:
    """The fused experts' input-side tensor as [experts, out, in] (a view: scaling it scales
    the parameter), the one that reads the norm output."""
    first = experts.params[0]
    return as_rows(getattr(module, first.name).data, first.layout)


def scale_expert_inputs(rows: torch.Tensor, router: nn.Module | None, s: torch.Tensor) -> None:
    """Multiply every expert's input columns by ``s``, and the router's (it reads the same norm
    output and stays in full precision), after ``s`` was folded into the norm: the function is
    unchanged."""
    rows.mul_(s.to(rows.dtype)[None, None, :])
    if router is not None:
        weight = weight_of(router)
        weight.mul_(s.to(weight.dtype)[None, :])


@torch.no_grad()
def quantize_experts(
    weight: torch.Tensor, layout: str, fmt: QuantFormat, granularity: str, group_size: int
) -> torch.Tensor:
    """The dequantized fused tensor, every expert quantized as its own linear layer would be
    (per output channel, per group along the input, or per tensor *per expert*; NVFP4's tensor
    scale and fp8_block's 128-row tiles are per expert too, never across two experts)."""
    rows = as_rows(weight, layout)
    experts, out, inp = rows.shape
    if granularity in ("tensor", "block") or fmt.kind == "nvfp4":
        deq = torch.stack([quantize_weight(rows[e], fmt, granularity, group_size)[0] for e in range(experts)])
    else:
        deq = quantize_weight(rows.reshape(experts * out, inp), fmt, granularity, group_size)[0]
        deq = deq.reshape(experts, out, inp)
    deq = deq.to(weight.dtype)
    return deq if layout == "out_in" else deq.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- expert inputs

EXPERT_INPUTS_ATTR = "_qeval_expert_inputs"  # {tensor name: ActivationQuantizer} on an experts module
_MATMULS = (
    torch.nn.functional.linear,
    torch.matmul,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.bmm,
)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _weight_operand(func: Any, args: tuple) -> torch.Tensor | None:
    """The weight of a matmul-like call (``F.linear(x, w)``, ``x @ w``, ``bmm(x, w)``), else None."""
    if func in _MATMULS and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return args[1]
    return None


class _QuantizeExpertInputs(torch.overrides.TorchFunctionMode):
    """While an experts module runs, quantize the input of every matmul whose weight is (a view
    of) one of its fused tensors, with that tensor's quantizer.

    The experts multiply inside their module's forward (``F.linear(x, W[e])``, ``x @ W[e]``,
    ``torch.bmm(x, W)``), so there is no linear layer to wrap: the weight operand is recognised
    by its storage, which an expert's slice shares with the fused tensor, whatever the forward
    looks like.  Per-token quantization of a routed token's row is the same whichever expert
    it goes to, so this is what a deployed W8A8 MoE kernel quantizes.
    """

    def __init__(self, quantizers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.quantizers = quantizers

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        w = _weight_operand(func, args)
        quantizer = None if w is None else self.quantizers.get(_storage(w))
        if quantizer is not None:
            args = (quantizer(args[0]), *args[1:])
        return func(*args, **kwargs)


def quantize_expert_inputs(module: nn.Module, quantizers: dict[str, nn.Module]) -> None:
    """Make ``module`` (a fused-experts module) quantize the input of each named tensor's
    matmuls with its quantizer (an ActivationQuantizer); kept on the module for the record,
    the quantized-model cache and static calibration."""
    for name, quantizer in quantizers.items():
        module.add_module(f"qeval_input_quantizer_{name}", quantizer)
    setattr(module, EXPERT_INPUTS_ATTR, dict(quantizers))
    # transformers dispatches fused experts to grouped or batched kernels that gather the
    # experts' weights into new tensors; the eager path multiplies views of the fused tensors
    use_eager_experts(module)
    forward = module.forward

    def quantized_forward(*args: Any, **kwargs: Any) -> Any:
        by_storage = {_storage(getattr(module, n)): q for n, q in getattr(module, EXPERT_INPUTS_ATTR).items()}
        with _QuantizeExpertInputs(by_storage):
            return forward(*args, **kwargs)

    module.forward = quantized_forward


class _CollectExpertInputs(torch.overrides.TorchFunctionMode):
    """Hand ``on_input(expert, x)`` the input of every matmul on a slice ``W[e]`` of one fused
    tensor: the tokens routed to expert ``e`` (the eager experts path multiplies views)."""

    def __init__(self, weight: torch.Tensor, on_input: Any) -> None:
        super().__init__()
        self.weight, self.on_input = weight, on_input
        self.storage, self.offset, self.stride = _storage(weight), weight.storage_offset(), weight.stride(0)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (w := _weight_operand(func, args)) is not None and _storage(w) == self.storage:
            if w.dim() == 2:
                self.on_input((w.storage_offset() - self.offset) // self.stride, args[0].detach())
            elif w.dim() == 3:  # batched over every expert at once
                for e in range(w.shape[0]):
                    self.on_input(e, args[0][e].detach())
        return func(*args, **kwargs)


def use_eager_experts(module: nn.Module) -> None:
    """Run a fused-experts module on transformers' eager path (one matmul per expert on views of
    the fused tensors, the same arithmetic as the grouped kernels), which is what matching its
    matmuls by storage needs."""
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", None) not in (None, "eager"):
        config._experts_implementation = "eager"  # type: ignore[union-attr]


def collecting_expert_inputs(weight: torch.Tensor, on_input: Any) -> torch.overrides.TorchFunctionMode:
    """A context in which every expert's matmul on ``weight`` reports (expert, input)."""
    return _CollectExpertInputs(weight, on_input)
