"""Invariants every quantization method must hold on every family of the adapter table.

The families are not listed by hand: they are every tiny random model
(``qeval.models.tiny.ALL_TINY_FAMILIES``) whose ``model_type`` has an entry in
``qeval.models.adapters.ADAPTERS``, so a family added to both is checked here without
editing this file.  Whether a method applies is read from the adapter too (``foldable``,
``why_not_rotatable``, ``norm_kind``, ``experts``); where it does not, the method must be
refused with ``UnsupportedCellError`` naming the adapter's reason, before any weight moves.
"""

from __future__ import annotations

import math

import pytest
import torch

from qeval.config import ActivationSpec, QuantSpec, WeightSpec
from qeval.errors import UnsupportedCellError
from qeval.models.adapters import ADAPTERS, present
from qeval.models.tiny import ALL_TINY_FAMILIES, build_tiny_model
from qeval.quant import coverage
from qeval.quant.apply import quantize_model, target_linears
from qeval.quant.experts import as_rows, collecting_expert_inputs, find_fused_experts, routers, use_eager_experts
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.quarot import rotate_model
from qeval.quant.methods.smoothquant import smooth_model
from qeval.quant.recipe import get_method

MODEL_TYPE = {family: make_config().model_type for family, make_config in ALL_TINY_FAMILIES.items()}
FAMILIES = sorted(f for f in ALL_TINY_FAMILIES if MODEL_TYPE[f] in ADAPTERS)


def _adapter(family):
    return ADAPTERS[MODEL_TYPE[family]]


def _rotatable(adapter):
    return adapter.foldable and not adapter.why_not_rotatable and adapter.norm_kind == "rms"


FOLDABLE = [f for f in FAMILIES if _adapter(f).foldable]
NOT_FOLDABLE = [f for f in FAMILIES if not _adapter(f).foldable]
ROTATABLE = [f for f in FAMILIES if _rotatable(_adapter(f))]
NOT_ROTATABLE = [f for f in FAMILIES if not _rotatable(_adapter(f))]
DENSE = [f for f in FAMILIES if _adapter(f).experts is None]
MOE = [f for f in FAMILIES if _adapter(f).experts is not None]

CALIB = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
PROBE = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(9))
W3 = QuantSpec(name="w3g32", w=WeightSpec(bits=3, granularity="group", group_size=32))
W4 = QuantSpec(name="w4g32", w=WeightSpec(bits=4, granularity="group", group_size=32))
W8A8 = QuantSpec(
    name="w8a8", w=WeightSpec(bits=8, granularity="channel", sym=True), a=ActivationSpec(bits=8, granularity="token")
)
MIN_SHARE = 0.98


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a busy 2-core machine oversubscribed
    OpenMP threads make each small matmul 100x slower (as tests/test_dialogue.py found); restore
    the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(family):
    """The tiny model with random norm weights (and biases): they are ones (zeros) at init,
    which would let a transform that mishandles a norm's weight, or Gemma's ``1 + weight``,
    preserve the function by accident."""
    model = build_tiny_model(family)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.dim() == 1 and name == "weight":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                elif p.dim() == 1 and name == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _relative_logit_error(ref, model):
    """max |logits - ref logits| / max |ref logits| on a fixed probe batch."""
    with torch.no_grad():
        a, b = ref(PROBE).logits, model(PROBE).logits
    return ((a - b).abs().max() / a.abs().max()).item()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def _norm_names(family, model):
    """Every norm a scale is folded into: each block's norm groups and, in MoE blocks, the norm
    the experts and the router read."""
    adapter = _adapter(family)
    names = []
    for i, block in enumerate(adapter.get_blocks(model)):
        prefix = f"{adapter.blocks}.{i}."
        names += [prefix + g.norm for g in adapter.norm_groups_of(block)]
        if adapter.experts is not None and present(block, [adapter.experts]) and adapter.experts_norm:
            names.append(prefix + adapter.experts_norm)
    return sorted(set(names))


def _moved_norms(family, ref, model):
    names = _norm_names(family, model)
    moved = [
        n
        for n in names
        if not torch.allclose(model.get_submodule(n).weight, ref.get_submodule(n).weight, rtol=0, atol=0)
    ]
    return names, moved


# --------------------------------------------------------------------------- SmoothQuant


@pytest.mark.parametrize("family", FOLDABLE)
def test_smoothquant_preserves_logits_and_moves_every_folded_norm(family):
    """SmoothQuant only moves difficulty between activations and weights: in full precision the
    model must compute the same logits, otherwise its W8A8 numbers would measure a broken model,
    not quantization.  And the scales must really have been folded (every norm before a group of
    linears, and the experts' norm, moved), or the test would pass on a no-op."""
    ref, model = _tiny(family), _tiny(family)
    smooth_model(model, CALIB, alpha=0.5)
    names, moved = _moved_norms(family, ref, model)
    assert names and moved == names, (family, sorted(set(names) - set(moved)))
    err = _relative_logit_error(ref, model)
    assert err <= 1e-4, (family, err)


@pytest.mark.parametrize("family", NOT_FOLDABLE)
def test_smoothquant_is_refused_where_nothing_can_fold(family):
    """Where no norm reads a linear's input (post-norm-only blocks), a smoothing scale has
    nowhere to go: the cell must be refused with the adapter's reason, with no weight touched,
    rather than run unsmoothed under SmoothQuant's name."""
    adapter = _adapter(family)
    assert adapter.why_not_foldable
    model = build_tiny_model(family)
    before = _state(model)
    with pytest.raises(UnsupportedCellError) as direct:
        smooth_model(model, CALIB, alpha=0.5)
    with pytest.raises(UnsupportedCellError) as recipe:
        quantize_model(model, W8A8, get_method("smoothquant"), calibration=lambda: CALIB)
    for err in (direct, recipe):
        assert adapter.why_not_foldable in str(err.value)
    assert _unchanged(model, before)


# --------------------------------------------------------------------------- QuaRot


@pytest.mark.parametrize("family", ROTATABLE)
def test_quarot_rotation_preserves_logits(family):
    """QuaRot's rotation (norms folded, residual stream and values rotated, online Hadamard on
    down_proj's input) is orthogonal, so it must not change the full-precision function; the
    embeddings must have changed, so that the rotation really happened."""
    ref, model = _tiny(family), _tiny(family)
    rotate_model(model, seed=0)
    emb, ref_emb = model.get_input_embeddings().weight, ref.get_input_embeddings().weight
    assert (emb - ref_emb).abs().max().item() > 1e-3
    err = _relative_logit_error(ref, model)
    assert err <= 1e-4, (family, err)


def _quarot_reason(adapter):
    """The reason the refusal must state: the adapter's own where it gives one, else the norm
    kind's (LayerNorm's mean subtraction, Gemma's norms after attention/MLP)."""
    if not adapter.foldable:
        return adapter.why_not_foldable
    return adapter.why_not_rotatable or "commute with a rotation"


@pytest.mark.parametrize("family", NOT_ROTATABLE)
def test_quarot_is_refused_with_the_reason(family):
    """A rotation that does not commute with the family's blocks would silently change the
    model: the cell is refused, naming the family and why, before any weight moves."""
    adapter = _adapter(family)
    reason = _quarot_reason(adapter)
    spec = QuantSpec(name="w4a4", w=WeightSpec(bits=4, granularity="channel", sym=True), a=ActivationSpec(bits=4))
    model = build_tiny_model(family)
    before = _state(model)
    with pytest.raises(UnsupportedCellError) as direct:
        rotate_model(model, seed=0)
    with pytest.raises(UnsupportedCellError) as recipe:
        quantize_model(model, spec, get_method("quarot"))
    for err in (direct, recipe):
        assert reason in str(err.value) and adapter.model_type in str(err.value), str(err.value)
    assert _unchanged(model, before)


# --------------------------------------------------------------------------- AWQ


@pytest.mark.parametrize("family", FOLDABLE)
def test_awq_scaling_preserves_logits_before_rounding(family):
    """AWQ's searched scales are folded into norms (and previous linears) and multiplied into
    the weights, the experts' input-side tensor and the router of MoE blocks included: before
    rounding, the model must compute the same function, so that AWQ's only effect on the
    numbers is the rounding it protects.  AWQ's rounding (``quantize_weights``) transforms the
    model in place and returns the rounded weights without writing them (quantize_model does,
    and rounds the experts): called on its own with the clip search off, it leaves the
    transformed, unrounded model."""
    ref, model = _tiny(family), _tiny(family)
    awq = get_method("awq", {"clip": False}).rounding
    linears = target_linears(model)
    results = awq.quantize_weights(model, linears, W4.w, CALIB)
    assert sorted(results) == sorted(linears)
    # alpha = 0 (no scaling) is a legitimate search result for a group, so not every norm need
    # move; some must, or the fold path was not exercised
    names, moved = _moved_norms(family, ref, model)
    assert names and moved, family
    for fused in find_fused_experts(model):  # every expert's input columns and its router scaled
        first = fused.params[0].name
        scaled = getattr(model.get_submodule(fused.path), first)
        assert not torch.equal(scaled, getattr(ref.get_submodule(fused.path), first)), fused.path
    for path, router in routers(model).items():
        assert not torch.equal(router.weight, ref.get_submodule(path).weight), path
    err = _relative_logit_error(ref, model)
    assert err <= 1e-4, (family, err)


@pytest.mark.parametrize("family", NOT_FOLDABLE)
def test_awq_is_refused_where_nothing_can_fold(family):
    """AWQ without a place to fold its scale would be plain RTN under AWQ's name: refused with
    the adapter's reason, nothing touched."""
    adapter = _adapter(family)
    model = build_tiny_model(family)
    before = _state(model)
    with pytest.raises(UnsupportedCellError) as err:
        quantize_model(model, W4, get_method("awq"), calibration=lambda: CALIB)
    assert adapter.why_not_foldable in str(err.value)
    assert _unchanged(model, before)


# --------------------------------------------------------------------------- GPTQ


def _first_stage_inputs(family, fp):
    """The calibration inputs of the linears of block 0's first stage (they see the same inputs
    in the full-precision and the quantized model: nothing before them is quantized)."""
    adapter = _adapter(family)
    block = adapter.get_blocks(fp)[0]
    names = present(block, adapter.sequential()[0])
    inputs = {n: [] for n in names}
    hooks = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, _n=n: inputs[_n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in CALIB:
            fp(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn_on_the_first_stage_of_block_0(family):
    """GPTQ minimises each layer's output error on its calibration inputs; on the first stage
    of block 0 those inputs are exact, so its error there must be below RTN's (W3 g32).  If it
    is not, the adapter's execution order or the Hessian collection is wrong for the family."""
    adapter = _adapter(family)
    prefix = f"{adapter.blocks}.0."
    fp = build_tiny_model(family)
    inputs = _first_stage_inputs(family, fp)
    assert inputs and all(x.shape[0] > 0 for x in inputs.values()), (family, list(inputs))
    errors = {}
    for method in ("rtn", "gptq"):
        model = quantize_model(build_tiny_model(family), W3, get_method(method), calibration=lambda: CALIB)
        for n, x in inputs.items():
            layer = model.get_submodule(prefix + n)
            assert isinstance(layer, QuantLinear), (family, n)
            ref = fp.get_submodule(prefix + n).weight
            errors[method, n] = ((x @ (ref - layer.weight).T) ** 2).mean().item()
    for n in inputs:
        assert errors["gptq", n] < errors["rtn", n], (family, n, errors)


@pytest.mark.parametrize("family", MOE)
def test_gptq_beats_rtn_on_the_experts_input_side_tensor(family):
    """GPTQ on fused experts takes each expert's Hessian from the tokens routed to it: on the
    full-precision routed inputs of the first MoE block, the total output error of the
    input-side expert tensor must be below RTN's (W3 g32)."""
    fp = build_tiny_model(family)
    fused = find_fused_experts(fp)[0]
    module = fp.get_submodule(fused.path)
    param = fused.params[0]
    use_eager_experts(module)
    weight = getattr(module, param.name)
    routed = {}
    with collecting_expert_inputs(
        weight, lambda e, x: routed.setdefault(int(e), []).append(x.reshape(-1, x.shape[-1]))
    ):
        with torch.no_grad():
            for batch in CALIB:
                fp(batch)
    assert routed, family
    original = as_rows(weight.detach(), param.layout).clone()
    errors = {}
    for method in ("rtn", "gptq"):
        model = quantize_model(build_tiny_model(family), W3, get_method(method), calibration=lambda: CALIB)
        q = as_rows(getattr(model.get_submodule(fused.path), param.name).detach(), param.layout)
        errors[method] = sum(
            float(((torch.cat(xs) @ (original[e] - q[e]).T) ** 2).sum()) for e, xs in sorted(routed.items())
        )
    assert errors["gptq"] < errors["rtn"], (family, errors)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_w4_quantizes_the_eligible_weights(family, method):
    """A W4 cell must quantize (nearly) every eligible weight, experts and state-space
    projections included: a method that skips a family's layers would report numbers for a
    model that is mostly full precision."""
    model = quantize_model(build_tiny_model(family), W4, get_method(method), calibration=lambda: CALIB)
    account = coverage.account(model, W4)
    assert account.eligible > 0
    assert account.share >= MIN_SHARE, (family, method, account.summary())
    coverage.check(account, W4)


# --------------------------------------------------------------------------- OmniQuant

OMNI_EPOCHS = 3


@pytest.mark.parametrize("family", DENSE + MOE)
def test_omniquant_lwc_trains_every_block_and_quantizes_the_eligible_weights(family):
    """Weight-only OmniQuant (learnable weight clipping) needs only the blocks, so it must run
    on every family of the table: one loss per epoch for every block, all finite, and >= 98 % of
    the eligible weights quantized (fused experts too).  On dense blocks training at the default
    learning rate must lower the block loss (it did on every dense family, by about 5-18 % over three
    epochs); on the tiny MoE blocks the loss is not monotone (the quantized block's routing can
    change as its weights move: DeepSeek-V3's block 1 went 0.647, 0.574, 0.672), so only
    finiteness is asked there."""
    adapter = _adapter(family)
    recipe = get_method("omniquant", {"epochs": OMNI_EPOCHS})
    model = quantize_model(build_tiny_model(family), W4, recipe, calibration=lambda: CALIB)
    history = recipe.rounding.loss_history
    assert sorted(history) == list(range(len(adapter.get_blocks(model)))), (family, sorted(history))
    for block, losses in history.items():
        assert len(losses) == OMNI_EPOCHS and all(math.isfinite(v) for v in losses), (family, block, losses)
        if adapter.experts is None:
            assert losses[-1] < losses[0], (family, block, losses)
    account = coverage.account(model, W4)
    assert account.share >= MIN_SHARE, (family, account.summary())
