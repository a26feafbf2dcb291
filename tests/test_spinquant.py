"""SpinQuant: learned rotations stay orthogonal, keep the full-precision function, and lower
the quantized network's loss below that of the QuaRot rotations they start from."""

from __future__ import annotations

import pytest
import torch
from conftest import outlier_llama
from torch import nn

from qeval.config import ActivationSpec, QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.hadamard import random_rotation
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.quarot import fold_norms, head_dim_of
from qeval.quant.methods.spinquant import SpinQuant, cayley_step, learn_rotations, rotated_and_quantized
from qeval.quant.recipe import Recipe, get_method, make_step

ROTATABLE = ["llama", "qwen2", "phi3"]  # plain, with q/k/v biases, with fused qkv and gate_up
W4A4 = QuantSpec("w4a4", w=WeightSpec(4, "int", "channel", -1, True), a=ActivationSpec(4))
CALIB = [torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_cayley_steps_stay_orthogonal_and_descend():
    """On f(X) = ||X - T||^2 with T orthogonal, Cayley SGD keeps X orthogonal to rounding error
    and reaches T."""
    g = torch.Generator().manual_seed(0)
    target = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0]
    x = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0]
    if torch.det(x) * torch.det(target) < 0:  # the same connected component of O(n)
        x[:, 0] = -x[:, 0]
    losses = []
    for _ in range(300):
        losses.append(((x - target) ** 2).sum().item())
        cayley_step(x, 2 * (x - target), lr=0.2)
    eye = torch.eye(24, dtype=torch.float64)
    assert (x.T @ x - eye).abs().max() < 1e-10
    assert losses[-1] < 1e-3 * losses[0] and all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("family", ROTATABLE)
def test_learned_rotation_keeps_the_full_precision_function(family):
    ref, model = build_tiny_model(family), build_tiny_model(family)
    step = SpinQuant(steps=6)
    step.apply(model, W4A4, CALIB)
    assert len(step.loss_history) == 6
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4
    # and it is not QuaRot's: the residual rotation moved
    quarot = build_tiny_model(family)
    from qeval.quant.methods.quarot import rotate_model

    rotate_model(quarot, seed=0)
    assert not torch.allclose(model.model.embed_tokens.weight, quarot.model.embed_tokens.weight, atol=1e-4)


def test_training_lowers_the_quantized_loss_below_the_quarot_start():
    model = outlier_llama(30.0)
    cfg = model.config
    start = (random_rotation(cfg.hidden_size, 0), [random_rotation(head_dim_of(cfg), 1)] * cfg.num_hidden_layers)

    def quantized_loss(r1: torch.Tensor, r2: list[torch.Tensor]) -> float:
        adapter = fold_norms(model, "spinquant")
        online = random_rotation(cfg.intermediate_size, 2).float()
        params = nn.Parameter(r1.float()), [nn.Parameter(r.float()) for r in r2]
        with torch.no_grad(), rotated_and_quantized(model, adapter, W4A4, *params, online):
            return sum(model(input_ids=b, labels=b).loss.item() for b in CALIB) / len(CALIB)

    before = quantized_loss(*start)
    r1, r2, _ = learn_rotations(model, W4A4, CALIB, steps=60, lr=1.5, seed=0, online_down=True)
    eye = torch.eye(cfg.hidden_size, dtype=torch.float64)
    assert (r1.T @ r1 - eye).abs().max() < 1e-10 and all(
        (r.T @ r - torch.eye(r.shape[0])).abs().max() < 1e-10 for r in r2
    )
    assert quantized_loss(r1, r2) < before - 0.05


def test_spinquant_then_gptq_quantizes_every_linear():
    model = outlier_llama(30.0)
    recipe = Recipe.of([make_step("spinquant", {"steps": 4}), make_step("gptq")])
    quantize_model(model, W4A4, recipe, calibration=lambda: CALIB)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert all(m.input_quantizer is not None and m.qweight is not None for m in linears)
    assert recipe.rounding.name == "gptq"


@pytest.mark.parametrize(
    "family", sorted(set(TINY_FAMILIES) - {"llama", "qwen2", "phi3", "mistral", "granite", "qwen3"})
)
def test_families_quarot_cannot_rotate_are_refused_by_name(family):
    model = build_tiny_model(family)
    with pytest.raises(UnsupportedCellError, match=model.config.model_type):
        quantize_model(model, W4A4, get_method("spinquant"), calibration=lambda: CALIB)
