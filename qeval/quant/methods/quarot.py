"""QuaRot-style rotation (Ashkboos et al., 2024): remove outliers by rotating.

In full precision the rotated model computes the same function:

1. RMSNorm weights are folded into the linears they feed (and the final norm
   into the head, untied from the embeddings first), leaving scale-free norms,
   which commute with rotations (they only divide by the vector's norm).
2. The residual stream is rotated by a random orthogonal Q (a randomized
   Hadamard matrix when one of that order can be built): embeddings E Q,
   readers of the stream (q, k, v, gate, up, head) W Q, writers (o, down) Q^T W.
3. Each attention head's values are rotated by a Hadamard matrix on the head
   dimension: v_proj's rows and o_proj's matching columns (V in the KV cache is
   rotated too).
4. The input of down_proj is rotated online by a Hadamard matrix H
   (x -> x H, W_down -> W_down H): the fake-quant linear applies H before
   quantizing its input.

As a recipe step this is a transform: weights are then rounded with RTN
(``method=quarot``) or whatever rounding follows it (``method=[quarot,gptq]``, the
old ``quarot_gptq``: Hessians taken on the rotated inputs); activations and KV are
quantized per token as the cell's spec says.

Needs pre-norm blocks with RMSNorm: Gemma 3 (norms after attention/MLP, before
the residual add) and OPT (LayerNorm's mean subtraction does not commute with
a rotation) are refused with a message naming the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qeval.config import QuantSpec
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import Adapter, adapter_for, get_folding_adapter
from qeval.placement import current_placement, onloaded
from qeval.quant.hadamard import random_rotation
from qeval.quant.methods.base import Transform
from qeval.quant.methods.registry import register_method
from qeval.quant.transforms import untie_output_embeddings
from qeval.quant.typing_helpers import (
    as_linear,
    config_of,
    input_embeddings,
    linear_at,
    output_embeddings,
    weight_of,
)

INPUT_TRANSFORM_ATTR = "qeval_input_transform"


_WHY_NOT = {
    "layernorm": "its LayerNorm subtracts the mean, which does not commute with a rotation",
    "rms_one_plus": "its RMSNorms applied to the attention/MLP outputs before the residual add "
    "do not commute with a rotation of the residual stream",
}


def _check_rotatable(model: nn.Module | None, adapter: Adapter) -> None:
    if adapter.why_not_rotatable:
        raise UnsupportedCellError(
            f"quarot does not support model_type {adapter.model_type!r}: {adapter.why_not_rotatable}"
        )
    if adapter.norm_kind != "rms":
        raise UnsupportedCellError(
            f"quarot does not support model_type {adapter.model_type!r}: "
            f"{_WHY_NOT.get(adapter.norm_kind, 'its norms are not plain pre-norm RMSNorms')}"
        )


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    weight = weight_of(norm)
    for lin in linears:
        lin.weight.mul_(weight.to(lin.weight.dtype)[None, :])
    weight.fill_(1.0)


@torch.no_grad()
def _rotate_in(lin: nn.Linear, Q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ Q.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def _rotate_out(lin: nn.Linear, Q: torch.Tensor) -> None:
    Q = Q.to(lin.weight.device)
    lin.weight.copy_((Q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ Q).to(lin.bias.dtype))


@torch.no_grad()
def fold_norms(model: nn.Module, method: str = "quarot") -> Adapter:
    """Fold every RMSNorm's weight into the linears it feeds (the final norm into the head,
    untied from the embeddings first), leaving scale-free norms that commute with a rotation
    of the residual stream.  Function-preserving and idempotent (a folded norm's weight is 1)."""
    adapter = get_folding_adapter(model, method)
    _check_rotatable(model, adapter)
    untie_output_embeddings(model)
    head = as_linear(output_embeddings(model), "the output embeddings")
    for block in adapter.get_blocks(model):
        for group in adapter.norm_groups_of(block):
            _fold_norm(block.get_submodule(group.norm), [linear_at(block, n) for n in group.linears])
    _fold_norm(model.get_submodule(adapter.final_norm), [head])
    return adapter


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@torch.no_grad()
def rotate_model(
    model: nn.Module,
    seed: int = 0,
    online_down: bool = True,
    residual: torch.Tensor | None = None,
    values: list[torch.Tensor] | None = None,
    method: str = "quarot",
) -> None:
    """Apply the rotation in place (full precision; the function is unchanged): the residual
    stream by ``residual`` (default: a random Hadamard matrix from ``seed``), each block's
    values by ``values[i]`` (default: one random Hadamard matrix for all blocks) — SpinQuant
    passes the rotations it learned."""
    adapter = fold_norms(model, method)
    cfg = config_of(model)
    emb, head = input_embeddings(model), as_linear(output_embeddings(model), "the output embeddings")
    blocks = adapter.get_blocks(model)
    Q = random_rotation(cfg.hidden_size, seed) if residual is None else residual.double()
    emb_weight = weight_of(emb)
    emb_weight.copy_((emb_weight.double() @ Q.to(emb_weight.device)).to(emb_weight.dtype))
    _rotate_in(head, Q)
    if values is None:
        values = [random_rotation(head_dim_of(cfg), seed + 1)] * len(blocks)
    compute = current_placement(model).compute
    Q = Q.to(compute)  # once: every block is rotated on the compute device
    for block, Hd in zip(blocks, values, strict=True):
        with onloaded(block, compute):
            _rotate_block(block, adapter, cfg, Q, Hd.double().to(compute), seed, online_down)


def _rotate_block(
    block: nn.Module, adapter: Adapter, cfg: Any, Q: torch.Tensor, Hd: torch.Tensor, seed: int, online_down: bool
) -> None:
    """One block's share of the rotation: what reads the residual stream, what writes it, the
    values per head and (optionally) the online rotation of the down projection's input."""
    # readers of the residual stream: the linears behind the norms; writers: the ends of the
    # pairs (o, down)
    for group in adapter.norm_groups_of(block):
        for n in group.linears:
            _rotate_in(linear_at(block, n), Q)
    pairs = adapter.pairs_of(block)
    for pair in pairs:
        _rotate_out(linear_at(block, pair.next), Q)
    v_o = next(p for p in pairs if p.per_head)
    _rotate_values(linear_at(block, v_o.prev), linear_at(block, v_o.next), v_o.rows(cfg), Hd)
    if online_down:
        down = linear_at(block, next(p for p in pairs if not p.per_head).next)
        H = random_rotation(down.in_features, seed + 2)
        _rotate_in(down, H)
        # a buffer, so the rotation moves with the linear to whatever device it runs on
        down.register_buffer(INPUT_TRANSFORM_ATTR, H.to(down.weight.device, down.weight.dtype), persistent=False)
        down.register_forward_pre_hook(lambda m, args: (args[0] @ getattr(m, INPUT_TRANSFORM_ATTR), *args[1:]))


@torch.no_grad()
def _rotate_values(v: nn.Linear, o: nn.Linear, rows: slice, Hd: torch.Tensor) -> None:
    """Each head's values by ``Hd``: V's rows (``rows`` of a fused qkv_proj) and O's matching
    input columns."""
    head_dim = Hd.shape[0]
    Hd = Hd.to(v.weight.device)
    weight = v.weight[rows]  # a view: rotated in place
    wv = weight.double().reshape(-1, head_dim, v.in_features)  # [kv_heads, head_dim, hidden]
    weight.copy_(torch.einsum("dk,hdi->hki", Hd, wv).reshape_as(weight).to(weight.dtype))
    if v.bias is not None:
        bias = v.bias[rows]
        bias.copy_((bias.double().reshape(-1, head_dim) @ Hd).reshape(-1).to(bias.dtype))
    wo = o.weight.double().reshape(o.out_features, -1, head_dim)  # [hidden, heads, head_dim]
    o.weight.copy_((wo @ Hd).reshape_as(o.weight).to(o.weight.dtype))


@dataclass(frozen=True)
class QuaRotParams:
    seed: int = 0  # seed of the random signs / rotation
    online_down: bool = True  # Hadamard on down_proj's input, applied online


@register_method
class QuaRot(Transform):
    """Function-preserving rotation; the rounding after it is RTN unless the recipe names one
    (``method=[quarot,gptq]``, which ``quarot_gptq`` stands for)."""

    name = "quarot"
    uses_adapter = True
    folds_scales = True
    tensor_types = frozenset({"W", "WA", "W+KV", "WA+KV"})
    needs_calibration = False
    Params = QuaRotParams
    seed: int
    online_down: bool

    def check_architecture(self, model_type: str | None) -> None:
        super().check_architecture(model_type)
        if model_type is not None:
            _check_rotatable(None, adapter_for(model_type, self.name))

    def apply(self, model: nn.Module, spec: QuantSpec, calib: list[torch.Tensor] | None) -> None:
        rotate_model(model, self.seed, self.online_down)
