"""The quantized-model cache: a model read back from disk is the model the method produced
(same tensors, codes, static scales, online transforms, same logits), for methods that
change the model's structure; damaged or mismatched entries are misses, not wrong models;
and through ``run_cell`` a second run reads the cache instead of re-running the method."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
from qeval.models.tiny import build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.cache import MANIFEST, WEIGHTS, load_quantized, save_quantized
from qeval.quant.linear import QuantLinear
from qeval.quant.recipe import get_method

CALIB = [torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
X = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(7))

W4G32 = WeightSpec(bits=4, granularity="group", group_size=32, sym=False)
CASES = {
    # name: (family, method, params, spec)
    "gptq-w4g32": ("llama", "gptq", {}, QuantSpec(name="w4g32", w=W4G32)),
    "smoothquant-w8a8-static": (
        "llama",
        "smoothquant",
        {},
        QuantSpec(
            name="w8a8s",
            w=WeightSpec(bits=8, granularity="channel", sym=True),
            a=ActivationSpec(bits=8, granularity="tensor", dynamic=False, sym=False),
        ),
    ),
    "quarot-w4a4-kv4": (
        "qwen2",
        "quarot",
        {},
        QuantSpec(
            name="w4a4kv4",
            w=WeightSpec(bits=4, granularity="channel", sym=True),
            a=ActivationSpec(bits=4),
            kv=KVSpec(bits=4),
        ),
    ),
    # weight-activation OmniQuant learns LET: OPT's norms and biases change too
    "omniquant-let-opt": (
        "opt",
        "omniquant",
        {"epochs": 1},
        QuantSpec(name="w4a8", w=WeightSpec(bits=4, granularity="channel", sym=True), a=ActivationSpec(bits=8)),
    ),
}


def _quantized(case: str) -> tuple[torch.nn.Module, torch.nn.Module, QuantSpec]:
    family, method, params, spec = CASES[case]
    base = build_tiny_model(family)
    model = quantize_model(copy.deepcopy(base), spec, get_method(method, params), lambda: CALIB)
    return base, model, spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_model_is_the_quantized_model(case, tmp_path):
    base, model, spec = _quantized(case)
    save_quantized(model, tmp_path / "entry")
    restored = copy.deepcopy(base)
    assert load_quantized(restored, tmp_path / "entry", spec)
    a, b = model.state_dict(), restored.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            other = restored.get_submodule(name)
            assert isinstance(other, QuantLinear)
            if module.qweight is not None:
                assert torch.equal(module.qweight.q, other.qweight.q)
                assert torch.equal(module.qweight.scale, other.qweight.scale)
                assert module.qweight.fmt == other.qweight.fmt
            aq, bq = module.input_quantizer, other.input_quantizer
            assert (aq is None) == (bq is None)
            if aq is not None and not aq.dynamic:
                assert torch.equal(aq.scale, bq.scale)
    with torch.no_grad():
        torch.testing.assert_close(restored(X).logits, model(X).logits, rtol=0, atol=0)
    # the restored model really is quantized: it differs from the unquantized one
    with torch.no_grad():
        assert not torch.allclose(base(X).logits, restored(X).logits)


def test_damaged_or_foreign_entries_are_misses(tmp_path):
    base, model, spec = _quantized("gptq-w4g32")
    entry = save_quantized(model, tmp_path / "entry")
    assert not load_quantized(copy.deepcopy(base), tmp_path / "absent", spec)
    # a model of another family does not fit the entry: a miss, not an exception
    assert not load_quantized(build_tiny_model("opt"), entry, spec)
    # truncated weights: a miss
    data = (entry / WEIGHTS).read_bytes()
    (entry / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert not load_quantized(copy.deepcopy(base), entry, spec)
    # an entry of another cache format: a miss
    save_quantized(model, entry)
    manifest = json.loads((entry / MANIFEST).read_text())
    (entry / MANIFEST).write_text(json.dumps({**manifest, "format": -1}))
    assert not load_quantized(copy.deepcopy(base), entry, spec)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_run_cell_reads_the_cache_on_a_second_sweep(tmp_path, monkeypatch):
    from conftest import require_eval_data

    from qeval.cli import compose_config
    from qeval.quant.methods.gptq import GPTQ
    from qeval.runner import run_cell

    require_eval_data()
    calls = []
    original = GPTQ.quantize_weights
    monkeypatch.setattr(GPTQ, "quantize_weights", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    common = [
        "model=tiny-llama",
        "suite=tiny",
        "quant=w4g128",
        "method=gptq",
        "quantized_cache=true",
        f"cache_dir={tmp_path / 'cache'}",
        "calib.nsamples=4",
        "calib.seqlen=64",
    ]
    first = run_cell(compose_config(common + [f"results_dir={tmp_path / 'a'}"]))
    second = run_cell(compose_config(common + [f"results_dir={tmp_path / 'b'}"]))
    assert first["status"] == second["status"] == "ok"
    assert (first["quantized_cache"], second["quantized_cache"]) == ("miss", "hit")
    assert len(calls) == 1  # GPTQ ran once; the second sweep read its output
    assert first["metrics"] == second["metrics"]
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 1
