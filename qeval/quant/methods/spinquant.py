"""SpinQuant (Liu et al., 2024): QuaRot's rotations, learned.

QuaRot rotates the residual stream by a random Hadamard matrix (R1) and each head's values by
another (R2); any orthogonal matrices keep the full-precision function, but some make the
*quantized* network better than others.  SpinQuant starts from QuaRot's matrices and trains
R1 and one R2 per block against the quantized network's next-token loss on calibration data:

* the network is run with every weight rotated on the fly (``W R1``, ``R1^T W``, the values
  per head by ``R2``) and fake-quantized as the cell's spec says, with straight-through
  rounding (and its activations too for WA specs), so the loss sees the rounding;
* the rotations stay orthogonal by construction: each step is a Cayley transform on the
  Stiefel manifold, ``X <- (I + a/2 A)^-1 (I - a/2 A) X`` with the skew-symmetric
  ``A = G X^T - X G^T`` of the Euclidean gradient G, and a step size a <= lr bounded by
  ``1 / ||A||`` (Li et al.'s Cayley SGD, solved exactly rather than by fixed-point iteration);
* the online Hadamard before down_proj (QuaRot's R4) is kept, fixed.

The learned matrices (re-orthogonalised in float64) are then folded in exactly as QuaRot's are
(:func:`qeval.quant.methods.quarot.rotate_model`), so the model computes the same function in
full precision, and whatever rounding follows (RTN by default, ``method=[spinquant,gptq]``)
quantizes the rotated weights.  The KV cache is not quantized during training.

The defaults fit a CPU: 100 steps of one calibration sequence each (the paper: 800 steps of
batch 8 at 2048 tokens); ``method.spinquant.steps`` raises them.  The same families as QuaRot
(pre-norm RMSNorm blocks; no fused experts); the whole model must be resident (it trains
through every block at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from qeval.config import QuantSpec, quantized
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import Adapter, adapter_for
from qeval.placement import current_placement
from qeval.quant.formats import QuantFormat, fake_quantize, quantize_weight
from qeval.quant.hadamard import random_rotation
from qeval.quant.methods.base import Transform
from qeval.quant.methods.quarot import _check_rotatable, fold_norms, head_dim_of, rotate_model
from qeval.quant.methods.registry import register_method
from qeval.quant.typing_helpers import as_linear, config_of, input_embeddings, linear_at, output_embeddings


@torch.no_grad()
def cayley_step(x: torch.Tensor, grad: torch.Tensor, lr: float) -> float:
    """One Cayley-SGD step of the orthogonal ``x`` (in place) along the Riemannian descent
    direction of ``grad``; returns the step size used."""
    skew = grad @ x.T - x @ grad.T
    alpha = min(lr, 1.0 / (float(skew.norm()) + 1e-8))
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    x.copy_(torch.linalg.solve(eye + alpha / 2 * skew, (eye - alpha / 2 * skew) @ x))
    return alpha


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to ``x`` (its polar factor), in float64."""
    u, _, vh = torch.linalg.svd(x.double())
    return u @ vh


def _ste(w: torch.Tensor, quantized_w: torch.Tensor) -> torch.Tensor:
    return w + (quantized_w - w).detach()


class _Rotated(nn.Module):
    """A parametrization: a weight (or bias) rotated by the current R1/R2, then fake-quantized
    with straight-through rounding.  ``role`` says where the rotations act."""

    def __init__(
        self,
        r1: nn.Parameter,
        r2: nn.Parameter | None,
        reader: bool,
        writer: bool,
        value_rows: slice | None,
        values_in: bool,
        online: torch.Tensor | None,
        rounding: tuple[QuantFormat, str, int] | None,
        is_bias: bool = False,
    ) -> None:
        super().__init__()
        self.r1, self.r2 = r1, r2
        self.reader, self.writer, self.value_rows, self.values_in = reader, writer, value_rows, values_in
        self.online, self.rounding, self.is_bias = online, rounding, is_bias

    def _rotate_value_rows(self, w: torch.Tensor) -> torch.Tensor:
        assert self.r2 is not None and self.value_rows is not None
        head_dim = self.r2.shape[0]
        start, stop, _ = self.value_rows.indices(w.shape[0])
        rows = w[start:stop]
        if self.is_bias:
            rotated = (rows.reshape(-1, head_dim) @ self.r2).reshape(-1)
        else:
            rotated = torch.einsum("dk,hdi->hki", self.r2, rows.reshape(-1, head_dim, w.shape[-1])).reshape_as(rows)
        return torch.cat([w[:start], rotated, w[stop:]])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.is_bias:  # a writer's bias lives in the residual stream; a value bias per head
            if self.writer:
                w = w @ self.r1
            return self._rotate_value_rows(w) if self.value_rows is not None else w
        if self.reader:
            w = w @ self.r1
        if self.value_rows is not None:
            w = self._rotate_value_rows(w)
        if self.writer:
            w = self.r1.T @ w
        if self.values_in:
            assert self.r2 is not None
            w = (w.reshape(w.shape[0], -1, self.r2.shape[0]) @ self.r2).reshape(w.shape[0], -1)
        if self.online is not None:
            w = w @ self.online
        if self.rounding is not None:
            fmt, granularity, group_size = self.rounding
            w = _ste(w, quantize_weight(w, fmt, granularity, group_size)[0])
        return w


@contextlib.contextmanager
def rotated_and_quantized(
    model: nn.Module,
    adapter: Adapter,
    spec: QuantSpec,
    r1: nn.Parameter,
    r2: list[nn.Parameter],
    online: torch.Tensor | None,
) -> Iterator[None]:
    """The model computing with every weight rotated by (r1, r2) and fake-quantized per
    ``spec`` (straight-through), its linears' inputs quantized for WA specs; restored after."""
    cfg = config_of(model)
    w = spec.w
    rounding = (QuantFormat(bits=w.bits, kind=w.format, sym=w.sym), w.granularity, w.group_size)
    act_fmt = QuantFormat(bits=spec.a.bits, kind=spec.a.format, sym=spec.a.sym) if quantized(spec.a) else None
    registered: list[tuple[nn.Module, str]] = []
    hooks = []

    def add(module: nn.Module, name: str, p: _Rotated) -> None:
        parametrize.register_parametrization(module, name, p, unsafe=True)
        registered.append((module, name))

    def quantize_input(down_online: torch.Tensor | None):  # noqa: ANN202 - a hook factory
        def hook(_m: nn.Module, args: tuple) -> tuple:
            x = args[0] if down_online is None else args[0] @ down_online.to(args[0].dtype)
            if act_fmt is not None:
                x = _ste(x, fake_quantize(x, act_fmt, None))
            return (x, *args[1:])

        return hook

    try:
        add(input_embeddings(model), "weight", _Rotated(r1, None, True, False, None, False, None, None))
        head = as_linear(output_embeddings(model), "the output embeddings")
        head_rounding = rounding if spec.quantize_lm_head else None
        add(head, "weight", _Rotated(r1, None, True, False, None, False, None, head_rounding))
        for block, r2_block in zip(adapter.get_blocks(model), r2, strict=True):
            pairs = adapter.pairs_of(block)
            v_o = next(p for p in pairs if p.per_head)
            down = next(p for p in pairs if not p.per_head).next
            readers = {n for group in adapter.norm_groups_of(block) for n in group.linears}
            writers = {p.next for p in pairs}
            for name in sorted(readers | writers):
                lin = linear_at(block, name)
                rows = v_o.rows(cfg) if name == v_o.prev else None
                h = online if name == down else None
                reader, writer = name in readers, name in writers
                weight = _Rotated(r1, r2_block, reader, writer, rows, name == v_o.next, h, rounding)
                add(lin, "weight", weight)
                if lin.bias is not None and (writer or rows is not None):
                    add(lin, "bias", _Rotated(r1, r2_block, False, writer, rows, False, None, None, is_bias=True))
                if act_fmt is not None or h is not None:
                    hooks.append(lin.register_forward_pre_hook(quantize_input(h)))
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for module, name in reversed(registered):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def learn_rotations(
    model: nn.Module, spec: QuantSpec, calib: list[torch.Tensor], steps: int, lr: float, seed: int, online_down: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Train (R1, [R2 per block]) from QuaRot's random Hadamard start on the quantized
    network's loss; returns them (float64, orthogonal) and the loss of every step."""
    placement = current_placement(model)
    if not placement.resident:
        raise UnsupportedCellError(
            "spinquant trains its rotations through the whole network at once; this cell offloads the "
            f"model ({placement.reason or 'it does not fit the compute device'}): use quarot, or a larger device"
        )
    adapter = fold_norms(model, "spinquant")
    cfg = config_of(model)
    device = placement.compute
    blocks = adapter.get_blocks(model)
    # QuaRot's start (the same seeds as quarot.rotate_model): R1, one R2 copied per block, and
    # the fixed online Hadamard of down_proj's input
    r1 = nn.Parameter(random_rotation(cfg.hidden_size, seed).float().to(device))
    r2 = [nn.Parameter(random_rotation(head_dim_of(cfg), seed + 1).float().to(device)) for _ in blocks]
    online = None
    if online_down:
        down_name = next(p for p in adapter.pairs_of(blocks[0]) if not p.per_head).next
        online = random_rotation(linear_at(blocks[0], down_name).in_features, seed + 2).float().to(device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    rotations = [r1, *r2]
    try:
        with rotated_and_quantized(model, adapter, spec, r1, r2, online):
            for step in tqdm(range(steps), desc="spinquant", leave=False):
                batch = calib[step % len(calib)].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                grads = torch.autograd.grad(loss, rotations)
                step_lr = lr * (1 - step / steps)  # linear decay, as the reference schedule
                for x, g in zip(rotations, grads, strict=True):
                    cayley_step(x.data, g, step_lr)
                losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return nearest_orthogonal(r1.data), [nearest_orthogonal(r.data) for r in r2], losses


@dataclass(frozen=True)
class SpinQuantParams:
    steps: int = 100  # Cayley-SGD steps, one calibration sequence each (the paper: 800 x batch 8)
    lr: float = 1.5  # the reference learning rate, decayed linearly to 0
    seed: int = 0  # of the random Hadamard matrices training starts from
    online_down: bool = True  # QuaRot's fixed online Hadamard before down_proj

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"method.spinquant.steps={self.steps}: allowed a positive integer")
        if self.lr <= 0:
            raise ValueError(f"method.spinquant.lr={self.lr}: allowed a positive number")


@register_method
class SpinQuant(Transform):
    """Rotations R1/R2 learned by Cayley SGD against the quantized loss, folded in as QuaRot's;
    the rounding after it is RTN unless the recipe names one (``method=[spinquant,gptq]``)."""

    name = "spinquant"
    uses_adapter = True
    folds_scales = True
    tensor_types = frozenset({"W", "WA", "W+KV", "WA+KV"})
    needs_calibration = True
    Params = SpinQuantParams
    steps: int
    lr: float
    seed: int
    online_down: bool

    def __init__(self, params: Any = None, **overrides: Any) -> None:
        super().__init__(params, **overrides)
        self.loss_history: list[float] = []

    def check_architecture(self, model_type: str | None) -> None:
        super().check_architecture(model_type)
        if model_type is not None:
            _check_rotatable(None, adapter_for(model_type, self.name))

    def apply(self, model: nn.Module, spec: QuantSpec, calib: list[torch.Tensor] | None) -> None:
        if not calib:
            raise UnsupportedCellError("spinquant learns its rotations on calibration data; none was given")
        r1, r2, self.loss_history = learn_rotations(
            model, spec, calib, self.steps, self.lr, self.seed, self.online_down
        )  # fmt: skip
        rotate_model(model, self.seed, self.online_down, residual=r1, values=r2, method=self.name)
