"""Task plugins from a folder outside the repository, the registry, and self-calibration metrics."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from qeval.eval.calibration_error import calibration_scores, expected_calibration_error

MC_YAML = """\
task: my_colors
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  family: ethics
  primary_metric: acc
  higher_is_better: true
  data: colors.jsonl
"""

NATIVE_PY = '''
from qeval.eval.registry import NativeTask, register_task


@register_task
class WordCount(NativeTask):
    """Counts the tokens of a fixed prompt's greedy continuation: proves a cell ran it."""

    name = "my_word_count"
    family = "dialogue"
    primary_metric = "new_tokens"
    higher_is_better = False

    def __init__(self, max_new_tokens: int = 4):
        super().__init__(max_new_tokens=max_new_tokens)
        self.max_new_tokens = max_new_tokens

    def evaluate(self, ctx):
        ids = ctx.tokenizer("hello there", return_tensors="pt").input_ids
        out = ctx.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 min_new_tokens=self.max_new_tokens)
        return {"new_tokens": float(out.shape[1] - ids.shape[1]), "samples": 1,
                "has_reference": float(ctx.reference is not None)}
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_tasks")
    rows = [
        {"question": f"What color is item {i}?", "choices": ["red", "green", "blue"], "answer": i % 3} for i in range(6)
    ]
    data = root / "colors.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "colors").mkdir()
    (root / "colors" / "my_colors.yaml").write_text(MC_YAML.format(data=data))
    (root / "word_count.py").write_text(textwrap.dedent(NATIVE_PY))
    return root


def test_listing_includes_plugins_from_a_user_folder(plugin_dir):
    from qeval.eval.registry import list_tasks

    tasks = {t.name: t for t in list_tasks([str(plugin_dir)])}
    assert tasks["my_colors"].family == "ethics" and tasks["my_colors"].kind == "lm_eval"
    assert tasks["my_word_count"].family == "dialogue" and tasks["my_word_count"].kind == "native"
    assert not tasks["my_word_count"].higher_is_better
    # the repository's own plugins are listed too, with their families
    assert tasks["qeval_lambada_openai"].family == "basic_nlp"
    assert tasks["qeval_self_calibration"].family == "emergent"


def test_online_only_tasks_are_listed_placed_and_refused_offline(monkeypatch):
    """SIQA, RACE, HellaSwag: lm-eval's own tasks with qeval's family and metric, listed with
    the Hub dataset they read; offline, a suite naming one fails before any model loads."""
    from qeval.config import ConfigError, SuiteSpec, TaskEntry
    from qeval.eval.registry import ONLINE_TASKS, list_tasks, task_exists, task_info
    from qeval.eval.suite import check_suite, describe_suite

    listed = {t.name: t for t in list_tasks()}
    for name, online in ONLINE_TASKS.items():
        assert task_exists(name)  # lm-eval registers it under that name
        assert listed[name].kind == "lm_eval online" and online.hub in listed[name].data
        assert (task_info(name).family, task_info(name).primary_metric) == (online.family, online.primary_metric)
    suite = SuiteSpec("s", {"siqa": TaskEntry(task="social_iqa"), "hs": TaskEntry(task="hellaswag")})
    assert describe_suite(suite)["hs"]["family"] == "basic_nlp"
    monkeypatch.setenv("QEVAL_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"suite.tasks.siqa: social_iqa .* lighteval/siqa"):
        check_suite(suite)
    monkeypatch.setenv("QEVAL_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_suite(suite)  # online: accepted (nothing is downloaded by the check)


def test_small_groups_list_their_members_large_ones_collapse():
    from qeval.eval.registry import list_tasks

    listed = {t.name: t for t in list_tasks()}
    subsets = [f"qeval_ethics_{s}" for s in ("cm", "deontology", "justice", "utilitarianism", "virtue")]
    assert all(name in listed and name in listed["qeval_ethics"].description for name in subsets)
    assert "qeval_mmlu_anatomy" not in listed and "subtasks (qeval_mmlu_*)" in listed["qeval_mmlu"].description


def test_qeval_tasks_cli_prints_families(plugin_dir, capsys):
    from qeval.eval.list_cli import main

    main(["--include", str(plugin_dir)])
    out = capsys.readouterr().out
    assert "my_colors" in out and "my_word_count" in out and "\ndialogue\n" in out


def test_include_of_a_missing_folder_is_a_clear_error(tmp_path):
    from qeval.eval.registry import TaskDataError, task_paths

    with pytest.raises(TaskDataError, match="not a folder"):
        task_paths([str(tmp_path / "nope")])


def test_cell_runs_plugins_through_tasks_include(plugin_dir, tmp_path, qeval_in_process):
    """A whole `qeval` cell on a tiny model, with both plugin kinds picked up from tasks.include."""
    results = tmp_path / "results"
    proc = qeval_in_process(
        [
            "model=tiny-llama",
            "quant=w8",
            "method=rtn",
            "hydra.mode=RUN",
            "suite=tiny",
            "~suite.tasks.wikitext2",
            "~suite.tasks.lambada",
            f"tasks.include=[{plugin_dir}]",
            "+tasks.add.colors={task:my_colors}",
            "+tasks.add.count={task:my_word_count,params:{max_new_tokens:3}}",
            "+tasks.add.calib={task:qeval_self_calibration,params:{task:my_colors}}",
            f"results_dir={results}",
            "sweep_name=plugins",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record_path,) = (results / "plugins").glob("*.json")
    rec = json.loads(record_path.read_text())
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["metrics"]["colors"]["samples"] == 6 and 0 <= rec["metrics"]["colors"]["acc"] <= 1
    assert rec["metrics"]["count"] == {"new_tokens": 3.0, "samples": 1, "has_reference": 1.0}
    assert rec["metrics"]["calib"]["samples"] == 6 and 0 <= rec["metrics"]["calib"]["ece"] <= 1
    # the same items scored twice: self-calibration's accuracy is the MC task's
    assert rec["metrics"]["calib"]["acc"] == pytest.approx(rec["metrics"]["colors"]["acc"])
    assert rec["tasks"]["colors"] == {
        "task": "my_colors",
        "kind": "lm_eval",
        "family": "ethics",
        "primary_metric": "acc",
        "higher_is_better": True,
    }
    assert rec["tasks"]["count"]["kind"] == "native" and rec["tasks"]["count"]["family"] == "dialogue"


def test_unknown_task_fails_before_loading_a_model(tmp_path, qeval_in_process):
    proc = qeval_in_process(
        [
            "model=tiny-llama",
            "hydra.mode=RUN",
            "suite=tiny",
            "~suite.tasks.lambada",
            "+tasks.add.bad={task:no_such_task}",
            f"results_dir={tmp_path}",
        ],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "suite.tasks.bad.task='no_such_task'" in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- calibration metrics


def test_ece_of_known_bins():
    # two bins used: conf 0.95 (2 items, 1 right) and conf 0.55 (2 items, 2 right)
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert expected_calibration_error(conf, correct, bins=10) == pytest.approx(expected)


def test_calibration_scores_from_loglikelihoods():
    # item 1: p = (0.8, 0.2), gold 0 -> right, Brier 0.04 + 0.04; item 2: p = (0.5, 0.5), gold 1 -> argmax 0, wrong
    lls = [[math.log(0.8), math.log(0.2)], [math.log(0.3), math.log(0.3)]]
    scores = calibration_scores(lls, [0, 1], bins=10, bootstrap=50)
    assert scores.acc == 0.5 and scores.samples == 2
    assert scores.brier == pytest.approx((0.08 + 0.5) / 2)
    assert scores.ece == pytest.approx(0.5 * abs(1 - 0.8) + 0.5 * abs(0 - 0.5))
    assert scores.confidence == pytest.approx(0.65)


def test_perfectly_calibrated_predictions_have_zero_ece():
    # 10 items at confidence 0.7, 7 of them right
    lls = [[math.log(0.7), math.log(0.3)]] * 10
    gold = [0] * 7 + [1] * 3
    assert calibration_scores(lls, gold, bootstrap=0).ece == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- per-item outcomes


def test_keep_items_keeps_a_columnar_table():
    from qeval.eval.registry import TaskContext

    ctx = TaskContext(model=None, tokenizer=None)
    assert ctx.items is None  # a task that keeps none
    ctx.keep_items(id=("a", "b", "c"), acc=[1, 0, True], score=[0.5, math.nan, 2], answer=["x", None, "z"])
    assert ctx.items == {
        "id": ["a", "b", "c"],
        "acc": [1, 0, True],
        "score": [0.5, None, 2],
        "answer": ["x", None, "z"],
    }
    assert json.loads(json.dumps(ctx.items, allow_nan=False)) == ctx.items  # strict JSON: NaN became None
    assert type(ctx.items["score"][0]) is float and ctx.items["acc"][2] is True
    ctx.keep_items(id=["q"], acc=[torch.tensor(1.0).item()])  # a second call replaces the first
    assert ctx.items == {"id": ["q"], "acc": [1.0]}
    ctx.keep_items(id=[])  # no item scored: an empty table
    assert ctx.items == {"id": []}


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"acc": [1, 0]}, "needs an 'id' column"),
        ({"id": ["a", "b"], "acc": [1]}, "column 'acc' has 1 values, column 'id' has 2"),
        ({"id": ["a"], "acc": [1, 0]}, "column 'acc' has 2 values"),
        ({"id": ["a", "a"]}, "column 'id' repeats 'a'"),
        ({"id": [1, 2]}, "column 'id' row 0 is 1"),
        ({"id": ["a", ""]}, "column 'id' row 1"),
        ({"id": ["a", None]}, "column 'id' row 1 is None"),
        ({"id": ["a"], "answer": "a"}, "column 'answer' must be a list"),
        ({"id": ["a"], "acc": 1}, "column 'acc' must be a list"),
        ({"id": ["a"], "acc": {"a": 1}}, "column 'acc' must be a list"),
        ({"id": ["a"], "extra": [[1, 2]]}, "column 'extra' row 0 holds a list"),
        ({"id": ["a"], "acc": [torch.tensor(1)]}, "column 'acc' row 0 holds a Tensor"),
        ({"id": ["a"], "answer": ["x" * 300]}, "column 'answer' row 0 is a string of 300 characters"),
    ],
)
def test_keep_items_rejects_a_bad_table_naming_the_column(columns, message):
    from qeval.eval.registry import TaskContext

    ctx = TaskContext(model=None, tokenizer=None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ctx.keep_items(**columns)
    assert ctx.items is None  # nothing half-kept


def test_outcome_column_and_binary():
    from qeval.eval.registry import NativeTask, TaskContext, discover_native, short_text

    class Plain(NativeTask):  # a user plugin that never heard of items
        name, family, primary_metric = "plain", "dialogue", "score"

        def evaluate(self, ctx):
            return {"score": 1.0, "samples": 1}

    ctx = TaskContext(model=None, tokenizer=None)
    assert Plain().evaluate(ctx) == {"score": 1.0, "samples": 1} and ctx.items is None
    assert Plain.outcome_column() == "score"
    assert Plain.outcome_binary({"score": [0, 1, None, True]}) and not Plain.outcome_binary({"score": [0, 0.5]})
    assert not Plain.outcome_binary(None) and not Plain.outcome_binary({"score": [None]})
    native = discover_native()
    expected = {
        "qeval_mt_bench": ("degeneration", False),
        "qeval_needle": ("acc", True),
        "qeval_longeval_lines": ("acc", True),
        "qeval_longeval_topics": ("acc", True),
        "qeval_self_calibration": ("correct", True),
    }
    for name, (column, binary) in expected.items():
        assert (native[name].outcome_column(), native[name].outcome_binary()) == (column, binary), name
    assert short_text("  word  ") == "word" and short_text(None) is None
    assert short_text("y" * 100) == "y" * 79 + "…" and len(short_text("y" * 100, 10)) == 10


def test_self_calibration_keeps_its_items(plugin_dir):
    """Per item: correct (mean = acc), confidence (mean = confidence), brier (mean = brier), the
    chosen answer; ids stable across two evaluations; no ece column (ECE bins the items)."""
    from qeval.eval.registry import TaskContext, discover_native
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    task = discover_native([str(plugin_dir)])["qeval_self_calibration"](task="my_colors", bins=5)
    model, tok = build_tiny_model("llama"), byte_tokenizer()
    runs = []
    for _ in range(2):
        ctx = TaskContext(model=model, tokenizer=tok, limit=4, extra={"batch_size": 8, "include": (str(plugin_dir),)})
        runs.append((task.evaluate(ctx), ctx.items))
    (m, items), (m2, items2) = runs
    assert items is not None and items == items2 and m == m2
    assert items["id"] == [f"my_colors/{i}" for i in range(4)] and m["samples"] == 4
    assert set(items) == {"id", "correct", "confidence", "brier", "choice", "gold", "answer"}
    assert items["gold"] == [0, 1, 2, 0]  # answer = i % 3
    assert all(c in (0, 1) for c in items["correct"])
    assert items["correct"] == [int(c == g) for c, g in zip(items["choice"], items["gold"])]
    assert items["answer"] == [["red", "green", "blue"][c] for c in items["choice"]]
    for key, metric in (("correct", "acc"), ("confidence", "confidence"), ("brier", "brier")):
        assert sum(items[key]) / 4 == pytest.approx(m[metric], abs=1e-9), key
    assert all(1 / 3 <= c <= 1 for c in items["confidence"])
    # the ECE is the binned gap between these confidences and correctness
    ece = expected_calibration_error(
        torch.tensor(items["confidence"], dtype=torch.float64), torch.tensor(items["correct"]).bool(), 5
    )
    assert ece == pytest.approx(m["ece"], abs=1e-12)


def test_calibration_items_match_the_scores():
    from qeval.eval.calibration_error import calibration_items

    lls = [[math.log(0.8), math.log(0.2)], [math.log(0.3), math.log(0.3)], [math.log(0.1), math.log(0.9)]]
    items = calibration_items(lls, [0, 1, 1])
    assert items["correct"] == [1, 0, 1] and items["choice"] == [0, 0, 1] and items["gold"] == [0, 1, 1]
    assert items["confidence"] == pytest.approx([0.8, 0.5, 0.9])
    assert items["brier"] == pytest.approx([0.08, 0.5, 0.02])
    scores = calibration_scores(lls, [0, 1, 1], bootstrap=0)
    assert sum(items["brier"]) / 3 == pytest.approx(scores.brier, abs=1e-12)
    assert sum(items["confidence"]) / 3 == pytest.approx(scores.confidence, abs=1e-12)


def test_qevals_own_tasks_are_served_without_indexing_lm_evals(tmp_path):
    """A cell that names only tasks of qeval's (and the user's) folders gets the index of those
    folders -- milliseconds, not lm-eval's ~15,000 YAML files -- with the same entries the full
    index has; anything else (lm-eval's own tasks, a group with one of them) gets the full one."""
    from qeval.eval.registry import task_manager

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mixed.yaml").write_text("group: my_mixed\ntask:\n  - qeval_piqa\n  - arc_easy\n")
    (folder / "own.yaml").write_text("group: my_own\ntask:\n  - qeval_piqa\n  - qeval_boolq\n")
    include = (str(folder),)
    full = task_manager(include)  # no names: the full index, as before
    assert "hellaswag" in full.all_tasks and "qeval_piqa" in full.all_tasks
    for names in (["qeval_piqa"], ["qeval_mmlu"], ["qeval_ethics"], ["qeval_wikitext"], ["my_own"]):
        own = task_manager(include, names=names)
        assert own is not full and "hellaswag" not in own.all_tasks, names
        for name in own.all_tasks:  # the same configuration, wherever it is looked up
            assert own.task_index[name].cfg == full.task_index[name].cfg, name
    for names in (["hellaswag"], ["my_mixed"], ["qeval_piqa", "arc_easy"], ["nosuchtask"], []):
        assert task_manager(include, names=names) is full, names
    loaded = task_manager(include, names=["my_own"]).load(["my_own"])
    assert sorted(loaded["tasks"]) == ["qeval_boolq", "qeval_piqa"]
