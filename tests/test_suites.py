"""Every suite preset composes, passes the pre-flight checks (task names, data, params) and
covers the families it claims; the default suite covers all five."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qeval.cli import CONF_DIR
from qeval.eval.registry import FAMILIES

SUITES = sorted(p.stem for p in (Path(CONF_DIR) / "suite").glob("*.yaml"))


def _cfg(suite: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=["model=tiny-llama", f"suite={suite}"])


@pytest.mark.parametrize("suite", SUITES)
def test_suite_passes_preflight(suite):
    from conftest import require_eval_data

    require_eval_data()
    from qeval.cell import preflight
    from qeval.eval.suite import describe_suite

    cfg = preflight(_cfg(suite))
    described = describe_suite(cfg.suite, cfg.include)
    assert set(described) == set(cfg.suite.tasks)
    for name, info in described.items():
        assert info["family"] in FAMILIES, (suite, name, info)
        assert isinstance(info["higher_is_better"], bool) and info["primary_metric"]


def test_default_suite_is_the_paired_perplexity_run_and_every_family_has_a_suite():
    """The default suite measures what a few CPU minutes can decide (basic NLP by perplexity
    and divergence from the FP model, 2048-token windows, > 10k tokens); qllm_eval covers
    every family."""
    from conftest import require_eval_data

    require_eval_data()
    from qeval.cell import preflight
    from qeval.eval.suite import describe_suite

    cfg = preflight(_cfg("quick"))
    (entry,) = cfg.suite.tasks.values()
    assert entry.kind == "perplexity" and entry.seqlen == 2048 and entry.max_windows * (entry.seqlen - 1) > 10_000
    assert {info["family"] for info in describe_suite(cfg.suite).values()} == {"basic_nlp"}
    full = preflight(_cfg("qllm_eval"))
    assert {info["family"] for info in describe_suite(full.suite).values()} == set(FAMILIES)


@pytest.mark.parametrize(
    "suite,family",
    [
        ("basic_nlp", "basic_nlp"),
        ("emergent", "emergent"),
        ("ethics", "ethics"),
        ("dialogue", "dialogue"),
        ("long_context", "long_context"),
    ],
)
def test_family_suites_hold_their_family(suite, family):
    from qeval.cell import build_cell
    from qeval.eval.suite import describe_suite

    cfg = build_cell(_cfg(suite))
    families = {info["family"] for info in describe_suite(cfg.suite).values()}
    assert families == {family}


def test_a_typo_in_an_added_entry_names_the_entry():
    from qeval.cell import build_cell
    from qeval.config import ConfigError

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["model=tiny-llama", "+tasks.add.extra={task:qeval_arc_easy,limt:5}"])
    with pytest.raises(ConfigError, match="tasks.add.extra"):
        build_cell(cfg)


def test_entries_are_overridable_and_addable_from_the_command_line():
    """Any field of a preset's entry (even one the YAML leaves at its default), and whole new entries."""
    from qeval.cell import build_cell

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=tiny-llama",
                "suite=nlp-full",
                "suite.tasks.wikitext2.max_windows=2",
                "suite.tasks.lambada.num_fewshot=3",
                "+tasks.add.arc={task:qeval_arc_easy,limit:7,params:{a:1}}",
            ],
        )
    cell = build_cell(cfg)
    tasks = cell.suite.tasks
    assert tasks["wikitext2"].max_windows == 2 and tasks["lambada"].num_fewshot == 3
    assert tasks["arc"].limit == 7 and tasks["arc"].batch_size == 16 and tasks["arc"].params == {"a": 1}
    assert not cell.tasks.add


def test_family_table_keeps_a_task_that_dropped_to_zero():
    """Quality retained: accuracy 0 is 0 retained (the row stays); perplexity is inverted."""
    import pandas as pd

    from qeval.report.frames import add_normalized, family_table

    def row(quant, tt, metric, value, family, hib):
        return {
            "model": "m",
            "tensor_type": tt,
            "bits": quant.upper(),
            "quant": quant,
            "method": "rtn",
            "suite": "s",
            "backend": "hf",
            "sweep": "x",
            "task": metric.split(".")[0],
            "metric": metric,
            "value": value,
            "stderr": None,
            "samples": 1,
            "family": family,
            "primary": True,
            "higher_is_better": hib,
        }

    long = pd.DataFrame(
        [
            row("fp16", "FP", "needle.acc", 0.8, "long_context", True),
            row("kv2", "KV", "needle.acc", 0.0, "long_context", True),
            row("fp16", "FP", "wt.ppl", 20.0, "basic_nlp", False),
            row("kv2", "KV", "wt.ppl", 40.0, "basic_nlp", False),
        ]
    )
    table = family_table(add_normalized(long)).reset_index().set_index("quant")
    assert table.loc["kv2", "long_context"] == 0.0 and table.loc["kv2", "basic_nlp"] == pytest.approx(0.5)
    assert table.loc["fp16", "long_context"] == 1.0 and table.loc["fp16", "basic_nlp"] == 1.0
