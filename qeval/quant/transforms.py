"""Function-preserving rescalings shared by SmoothQuant, AWQ and OmniQuant's LET.

Dividing a linear's input channel j by s_j and multiplying the matching
weight column by s_j leaves the layer's output unchanged; the division is
folded into whatever produced the input (a norm's weight, or the output rows of
the previous linear), so the model computes the same function in full
precision while the quantizer sees easier tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from qeval.quant.typing_helpers import input_embeddings, output_embeddings, tensor_attr, weight_of


def untie_output_embeddings(model: nn.Module) -> None:
    """Give the head its own copy of a weight tied to the input embeddings, so that a
    change to one (quantization, a folded norm, a rotation) leaves the other alone."""
    head, emb = output_embeddings(model), input_embeddings(model)
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(weight_of(emb).detach().clone(), requires_grad=False)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, scales: torch.Tensor, norm_kind: str) -> None:
    """Make ``norm``'s output divided by ``scales`` (per channel)."""
    weight = weight_of(norm)
    if norm_kind == "rms_one_plus":
        # Gemma: y = x_hat * (1 + w)  ->  (1 + w') = (1 + w) / s
        weight.copy_((1.0 + weight.float()) / scales - 1.0)
        return
    weight.div_(scales.to(weight.dtype))
    if norm_kind == "layernorm" and getattr(norm, "bias", None) is not None:
        bias = tensor_attr(norm, "bias")
        bias.div_(scales.to(bias.dtype))


@torch.no_grad()
def scale_inputs(linear: nn.Linear, scales: torch.Tensor) -> None:
    """Multiply weight column j by s_j (the layer now expects inputs divided by s)."""
    linear.weight.mul_(scales.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def fold_into_linear_output(linear: nn.Linear, scales: torch.Tensor, rows: slice = slice(None)) -> None:
    """Divide output row j (and bias j) of ``linear`` by s_j; ``rows``: the rows the scales are
    for, where the linear is fused (Phi-3's V rows of qkv_proj)."""
    linear.weight[rows].div_(scales.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias[rows].div_(scales.to(linear.bias.dtype))


def max_abs_per_input_channel(linears: list[nn.Linear]) -> torch.Tensor:
    """max_i |W_ij| over the rows of all linears sharing an input."""
    return torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
