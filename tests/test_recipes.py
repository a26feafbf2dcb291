"""Recipes compose (transforms, then one rounding), methods and backends plug in from outside."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import outlier_llama, require_eval_data

from qeval.config import ActivationSpec, ConfigError, QuantSpec, WeightSpec
from qeval.quant.apply import quantize_model
from qeval.quant.methods import METHODS
from qeval.quant.methods.gptq import GPTQ
from qeval.quant.methods.quarot import QuaRot
from qeval.quant.methods.smoothquant import SmoothQuant
from qeval.quant.recipe import Recipe, get_method

CALIB = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
W8A4 = QuantSpec(
    name="w8a4",
    w=WeightSpec(bits=8, granularity="channel", sym=True),
    a=ActivationSpec(bits=4, granularity="token", sym=True),
)
X = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(3))


def _error(recipe: Recipe, gain: float = 40.0) -> float:
    with torch.no_grad():
        ref = outlier_llama(gain)(X).logits
        model = quantize_model(outlier_llama(gain), W8A4, recipe, calibration=lambda: CALIB)
        return (model(X).logits - ref).pow(2).mean().item()


def test_alias_is_the_recipe_it_names():
    """quarot_gptq (the old class) is now [quarot, gptq]: the same steps, the same numbers."""
    alias = get_method("quarot_gptq")
    assert [s.name for s in alias.steps] == ["quarot", "gptq"] and alias.name == "quarot+gptq"
    with torch.no_grad():
        a = quantize_model(outlier_llama(30.0), W8A4, alias, calibration=lambda: CALIB)(X).logits
        b = quantize_model(outlier_llama(30.0), W8A4, Recipe.of([QuaRot(), GPTQ()]), calibration=lambda: CALIB)(
            X
        ).logits
    assert torch.equal(a, b)


def test_smoothquant_then_gptq_beats_each_alone_on_outliers():
    """The standard W8A8 recipe: smoothing makes the activations quantizable, GPTQ then rounds
    the smoothed weights; with a 40x outlier channel and 4-bit activations the recipe's logit
    error is below GPTQ alone (activations dominate) and not above smoothing with RTN."""
    errs = {
        "gptq": _error(get_method("gptq")),
        "smoothquant": _error(get_method("smoothquant")),
        "smoothquant+gptq": _error(Recipe.of([SmoothQuant(), GPTQ()])),
    }
    assert errs["smoothquant+gptq"] < 0.7 * errs["gptq"], errs
    assert errs["smoothquant+gptq"] <= errs["smoothquant"] * 1.05, errs


def test_implied_rounding_is_rtn_and_identity_keeps_the_old_form():
    sq = get_method("smoothquant")
    assert sq.rounding.name == "rtn" and sq.rounding_implied and sq.name == "smoothquant"
    # one-step recipes hash as the method did before recipes composed (old result files match)
    assert sq.identity() == {"name": "smoothquant", "params": {"alpha": 0.5}}
    assert get_method("rtn").identity() == {"name": "rtn", "params": {}}
    two = Recipe.of([SmoothQuant(alpha=0.8), GPTQ(damp=0.05)]).identity()
    assert two["name"] == "smoothquant+gptq" and two["steps"][0]["params"] == {"alpha": 0.8}
    assert two["steps"][1]["params"]["damp"] == 0.05


@pytest.mark.parametrize(
    "steps,reason",
    [
        (["gptq", "smoothquant"], "smoothquant comes after the rounding gptq"),
        (["gptq", "awq"], "two roundings (gptq and awq)"),
        (["nope"], "method='nope'"),
    ],
)
def test_bad_recipes_are_refused_with_the_reason(steps, reason):
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        get_method(steps)


def test_unknown_step_parameter_names_the_step():
    with pytest.raises(ConfigError, match=r"method\.gptq.*damp.*bogus"):
        Recipe.from_mapping({"gptq": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"method\.smoothquant.*alpha=1\.5.*0\.\.1"):
        Recipe.from_mapping({"smoothquant": {"alpha": 1.5}})


def test_wrong_order_fails_before_loading_from_the_cli(qeval_in_process, tmp_path):
    proc = qeval_in_process(
        ["model=tiny-llama", "suite=tiny", "quant=w8a8", "method=[gptq,smoothquant]", f"results_dir={tmp_path}"],
        tmp_path,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "smoothquant comes after the rounding gptq" in out and "method=[smoothquant,gptq]" in out
    assert "Traceback" not in out and "quantized in" not in out
    assert not list(tmp_path.rglob("*.json"))


PLUGIN = '''
"""A researcher's own step: a function-preserving rescaling of every decoder block's MLP
(up_proj rows x s, down_proj columns / s, with SiLU-gated MLPs being linear in up_proj)."""
from dataclasses import dataclass

import torch

from qeval.quant.methods import Transform, register_method


@dataclass(frozen=True)
class UpDownParams:
    scale: float = 2.0


@register_method
class UpDown(Transform):
    name = "updown_test"
    Params = UpDownParams
    tensor_types = frozenset({"W", "WA"})
    calls = 0

    def apply(self, model, spec, calib):
        type(self).calls += 1
        for block in model.model.layers:
            with torch.no_grad():
                block.mlp.up_proj.weight.mul_(self.scale)
                block.mlp.down_proj.weight.div_(self.scale)
'''


def test_a_method_plugin_runs_in_a_recipe(tmp_path):
    """methods.include=[file]: the step registers, its parameters are a typed Hydra node, and a
    cell runs it before the rounding."""
    require_eval_data()
    from qeval.cell import build_cell, load_method_plugins, register_configs
    from qeval.cli import compose_config, method_plugins_from_argv
    from qeval.runner import run_cell

    plugin = tmp_path / "updown.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    argv = [f"methods.include=[{plugin}]", "model=tiny-llama", "suite=tiny", "quant=w4g128"]
    try:
        load_method_plugins(method_plugins_from_argv(argv))
        register_configs()
        overrides = [*argv, "method=[updown_test,gptq]", "method.updown_test.scale=4.0", "~suite.tasks.lambada"]
        overrides += ["calib.nsamples=2", "calib.seqlen=64", f"results_dir={tmp_path}"]
        cell = build_cell(compose_config(overrides))
        assert [s.name for s in cell.recipe.steps] == ["updown_test", "gptq"]
        assert cell.recipe.transforms[0].scale == 4.0
        record = run_cell(cell)
        assert record["status"] == "ok", record.get("reason")
        assert record["cell"]["method"] == "updown_test+gptq"
        assert METHODS["updown_test"].calls == 1
        assert record["identity"]["method"]["steps"][0] == {"name": "updown_test", "params": {"scale": 4.0}}
    finally:
        METHODS.pop("updown_test", None)
        register_configs()


def test_a_third_backend_is_one_class(tmp_path):
    """A backend registered from outside (here: hf with its own settings class) is selectable as
    backend=<name>, hashes its own identity keys and scores every task kind it declares."""
    require_eval_data()
    from dataclasses import dataclass

    from qeval.backends import BACKENDS, register_backend
    from qeval.backends.hf import HFBackend, HFSettings
    from qeval.cell import build_cell, register_configs
    from qeval.cli import compose_config
    from qeval.runner import run_cell

    @dataclass(frozen=True)
    class TwinSettings(HFSettings):
        name: str = "hf_twin"
        note: str = "not part of the identity"

    @register_backend
    class Twin(HFBackend):
        name = "hf_twin"
        Settings = TwinSettings
        task_kinds = frozenset({"perplexity", "lm_eval"})

    try:
        register_configs()
        common = ["model=tiny-llama", "suite=tiny", "quant=w4g128", f"results_dir={tmp_path}"]
        twin = build_cell(compose_config([*common, "backend=hf_twin", "backend.note=x", "sweep_name=twin"]))
        # its identity keys, plus the scoring path hf adds for specs that allow shared contexts
        assert twin.identity()["backend"] == {"name": "hf_twin", "device": "cpu", "scoring": "shared-context"}
        a = run_cell(twin)
        b = run_cell(build_cell(compose_config([*common, "sweep_name=hf"])))
        assert a["status"] == b["status"] == "ok" and a["cell"]["backend"] == "hf_twin"
        assert json.dumps(a["metrics"], sort_keys=True) == json.dumps(b["metrics"], sort_keys=True)
    finally:
        BACKENDS.pop("hf_twin", None)
        register_configs()
