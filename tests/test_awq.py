"""AWQ: exact rescaling in full precision, scale and clip searches that never lose to RTN."""

from __future__ import annotations

import pytest
import torch

from qeval.config import QuantSpec, WeightSpec
from qeval.models.adapters import get_adapter
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.formats import QuantFormat, quantize_weight
from qeval.quant.linear import QuantLinear
from qeval.quant.methods.awq import search_clip, search_scales
from qeval.quant.recipe import get_method
from qeval.quant.transforms import fold_into_linear_output, fold_into_norm, scale_inputs

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.randint(3, 259, (1, 64), generator=GEN) for _ in range(6)]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_awq_style_scaling_leaves_logits_unchanged(family):
    """Random positive scales folded norm -> linears and prev linear -> next linear
    (every pair whose shapes allow it) keep the function in full precision."""
    ref, model = build_tiny_model(family), build_tiny_model(family)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    folded_pairs = 0
    for block in adapter.get_blocks(model):
        for group in adapter.norm_groups:
            lins = [block.get_submodule(n) for n in group.linears]
            s = torch.rand(lins[0].in_features, generator=g) * 3 + 0.2
            fold_into_norm(block.get_submodule(group.norm), s, adapter.norm_kind)
            for lin in lins:
                scale_inputs(lin, s)
        for pair in adapter.linear_pairs:
            prev, nxt = block.get_submodule(pair.prev), block.get_submodule(pair.next)
            if prev.out_features != nxt.in_features:
                continue
            s = torch.rand(nxt.in_features, generator=g) * 3 + 0.2
            fold_into_linear_output(prev, s)
            scale_inputs(nxt, s)
            folded_pairs += 1
    assert folded_pairs >= 2  # at least up -> down (or fc1 -> fc2) in each block
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


def test_scale_search_never_loses_to_rtn_and_helps_salient_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 30  # a few salient input channels
    lin = torch.nn.Linear(128, 64, bias=False)
    torch.nn.init.normal_(lin.weight, generator=g)
    fmt = QuantFormat(3, "int", False)
    s, alpha = search_scales(x, [lin], fmt, "group", 32)
    ref = x @ lin.weight.T
    rtn = quantize_weight(lin.weight.data, fmt, "group", 32)[0]
    awq = quantize_weight(lin.weight.data * s, fmt, "group", 32)[0] / s
    err_rtn, err_awq = (x @ rtn.T - ref).pow(2).mean(), (x @ awq.T - ref).pow(2).mean()
    assert alpha > 0 and err_awq < 0.9 * err_rtn


@pytest.mark.parametrize("cols,group_size", [(128, 32), (96, 64)])
def test_clip_search_lowers_partial_product_error(cols, group_size):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1024, cols, generator=g)
    w = torch.randn(48, cols, generator=g)
    w[:, 0] *= 8  # an outlier weight per row stretches its group's range
    fmt = QuantFormat(3, "int", False)
    clipped = search_clip(x, w, fmt, group_size)
    assert clipped.shape == w.shape and (clipped.abs() <= w.abs() + 1e-6).all()
    q_clip = quantize_weight(clipped, fmt, "group", group_size)[0]
    q_rtn = quantize_weight(w, fmt, "group", group_size)[0]
    assert (x @ (q_clip - w).T).pow(2).mean() < (x @ (q_rtn - w).T).pow(2).mean()


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_awq_runs_on_every_family_and_keeps_first_group_error_at_most_rtn(family):
    """Block 0's q/k/v see identical inputs in FP and quantized models; AWQ's scale search
    includes alpha=0 (plain RTN), so their joint output error can't be larger.  (Where v -> o
    is folded too, as in OPT without grouped-query attention, v's rows are rescaled afterwards
    and only the run itself is checked.)"""
    fp = build_tiny_model(family)
    adapter = get_adapter(fp)
    names = adapter.norm_groups[0].linears
    prefix = f"{adapter.blocks}.0."
    v_o = adapter.linear_pairs[0]
    v_o_folded = fp.get_submodule(prefix + v_o.prev).out_features == fp.get_submodule(prefix + v_o.next).in_features
    seen: list[torch.Tensor] = []
    h = fp.get_submodule(prefix + names[0]).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for b in CALIB:
            fp(b)
    h.remove()
    x = torch.cat(seen)
    spec = QuantSpec(name="w3g32", w=WeightSpec(bits=3, granularity="group", group_size=32))
    err = {}
    for method, params in (("rtn", {}), ("awq", {"clip": False})):
        model = quantize_model(build_tiny_model(family), spec, get_method(method, params), calibration=lambda: CALIB)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(adapter.block_linears()) * len(
            adapter.get_blocks(model)
        )
        with torch.no_grad():
            # compare outputs of the block's first norm group through the (possibly rescaled) model:
            # y = linear(norm(h)); use the FP norm input h = captured pre-norm state
            err[method] = sum(
                (x @ (fp.get_submodule(prefix + n).weight - _effective_weight(model, fp, prefix, adapter, n)).T)
                .pow(2)
                .mean()
                .item()
                for n in names
            )
    assert torch.isfinite(torch.tensor(err["awq"]))
    if not v_o_folded:
        assert err["awq"] <= err["rtn"] * 1.0001, err


def _effective_weight(model, fp, prefix, adapter, name):
    """The quantized weight seen from the *original* input: undo the norm's folded scale."""
    norm_name = adapter.norm_groups[0].norm
    w_fp_norm = fp.get_submodule(prefix + norm_name).weight.float()
    w_q_norm = model.get_submodule(prefix + norm_name).weight.float()
    if adapter.norm_kind == "rms_one_plus":
        ratio = (1 + w_q_norm) / (1 + w_fp_norm)
    else:
        ratio = w_q_norm / w_fp_norm
    return model.get_submodule(prefix + name).weight * ratio[None, :]
