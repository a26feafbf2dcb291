"""GPTQ (Frantar et al., 2022): quantize a layer's columns one at a time and
push each column's rounding error onto the columns not yet quantized, weighted
by the inverse Hessian of the layer's reconstruction loss.

* Hessian H = 2/n * sum(x x^T) over the calibration tokens of the layer's input,
  computed from the inputs the layer sees after the earlier layers (and blocks)
  were quantized.
* Dampening: ``damp`` (1 %) of the mean diagonal is added; dead inputs
  (zero diagonal) get 1 on the diagonal and zero weight.
* The upper Cholesky factor of H^-1 drives the updates; columns are processed
  in blocks of ``block_size`` (128) with lazy batch updates of the rest.
* ``act_order``: columns in order of decreasing diag(H); ``static_groups``:
  group scales computed on the original weights before any update (needed to
  keep contiguous groups, and so an exportable layout, with act_order).
* Groups follow the column index, so a partial last group (576 = 4 x 128 + 64)
  is handled exactly like RTN's.
* Within a block, layers are quantized sequentially in execution order
  (q/k/v, o, gate/up, down) from the adapter table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qeval.models.adapters import get_adapter
from qeval.quant.calibration import BlockInputs, collect_linear_inputs, run_blockwise
from qeval.quant.formats import QuantFormat, QuantizedTensor, fake_quantize_with_scale, quantize
from qeval.quant.methods import register_method
from qeval.quant.methods.base import QuantMethod


class HessianAccumulator:
    """Running average of 2 x x^T over every token seen."""

    def __init__(self, columns: int) -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = math.sqrt(2 / self.tokens) * x
        self.H += x.t() @ x


def _group_params(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point ([out, 1]) for a slice of columns, as RTN computes them."""
    qt = quantize(w, fmt, None)
    return qt.scale, qt.zero


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, granularity: str, group_size: int,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """GPTQ one ``[out, in]`` weight given its Hessian; returns (dequantized, codes or None)."""
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = group_size if granularity == "group" else cols
    n_groups = -(-cols // gs)

    if granularity == "tensor":
        s, z = _group_params(W.reshape(1, -1), fmt)
        fixed = (s.expand(rows, 1), None if z is None else z.expand(rows, 1))
    else:
        fixed = None
    static = [(_group_params(W[:, g * gs:(g + 1) * gs], fmt)) for g in range(n_groups)] if (
        static_groups or granularity == "channel") else None

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
    params: tuple[torch.Tensor, torch.Tensor | None] | None = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if fixed is not None:
                params = fixed
            elif static is not None:
                params = static[g]
            elif (i1 + i) % gs == 0:
                # dynamic groups: parameters from the *updated* weights of the group's columns
                block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                params = _group_params(block, fmt)
            assert params is not None
            scale, zero = params
            scales[:, g] = scale[:, 0]
            if zero is not None:
                zeros[:, g] = zero[:, 0]
            w = W1[:, i]
            q = fake_quantize_with_scale(w[:, None], fmt, scale, zero)[:, 0]
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    deq = Q[:, inv].to(weight.dtype)
    if granularity == "tensor" or (granularity == "group" and act_order and not static_groups):
        return deq, None  # scales not per contiguous group: not representable as QuantizedTensor
    zero_t = None if fmt.sym or fmt.kind != "int" else zeros
    s = torch.repeat_interleave(scales, gs, dim=1)[:, :cols]
    if fmt.kind != "int":
        codes = deq.float() / s
    else:
        z = 0 if zero_t is None else torch.repeat_interleave(zero_t, gs, dim=1)[:, :cols]
        codes = torch.round(deq.float() / s) + z
    return deq, QuantizedTensor(q=codes, scale=scales, zero=zero_t, group_size=gs, fmt=fmt)


@register_method
class GPTQ(QuantMethod):
    name = "gptq"
    tensor_types = frozenset({"W", "WA", "W+KV", "WA+KV"})
    needs_calibration = True

    def __init__(self, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                 static_groups: bool = False, true_sequential: bool = True) -> None:
        self.damp, self.block_size = damp, block_size
        self.act_order, self.static_groups = act_order, static_groups
        self.true_sequential = true_sequential

    def quantize_weights(self, model: nn.Module, linears: dict[str, nn.Linear], spec: Any,
                         calib: Any = None) -> dict[str, tuple[torch.Tensor, Any]]:
        adapter = get_adapter(model, "gptq")
        fmt = QuantFormat(bits=spec.bits, kind=spec.format, sym=spec.sym)
        results: dict[str, tuple[torch.Tensor, Any]] = {}

        def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            prefix = f"{adapter.blocks}.{i}."
            stages = adapter.sequential() if self.true_sequential else [adapter.block_linears()]
            for stage in stages:
                names = [n for n in stage if prefix + n in linears]
                hessians = {n: HessianAccumulator(block.get_submodule(n).in_features) for n in names}
                collect_linear_inputs(block, names, inputs, lambda n, x: hessians[n].add(x))
                for n in names:
                    layer = block.get_submodule(n)
                    deq, qt = gptq_quantize(layer.weight.data, hessians[n].H, fmt, spec.granularity,
                                            spec.group_size, self.damp, self.block_size, self.act_order,
                                            self.static_groups)
                    layer.weight.data = deq
                    results[prefix + n] = (deq, qt)

        run_blockwise(model, adapter, calib, process_block, desc="gptq")
        return self.round_remaining(linears, results, spec)
