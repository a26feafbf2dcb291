"""The multiple-choice and language-modelling task plugins (ARC, MMLU, PIQA, WinoGrande,
BoolQ, StrategyQA, the five ETHICS subsets and their group, TruthfulQA MC1/MC2,
document-level WikiText): their loaders turn the shared files into
the Hub schema lm-eval's prompts expect, with every row kept; the tasks build in
lm-eval's TaskManager; and each one runs end to end through ``evaluate_lm_eval``.

Expected row counts are read from the data files themselves or their PROVENANCE.md,
never typed in here, so the tests follow a user's own copy of the data.  Score parity
with lm-eval's registered tasks is checked by ``benchmarks/lmeval_parity.py`` (it needs
the real model).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import ModuleType

import pytest

from qeval.data import data_dir, local_file
from qeval.eval.registry import BUILTIN_TASKS_DIR, import_plugin_file

DATA_FILES = (
    "arc/ARC-Easy-Test.jsonl",
    "arc/ARC-Challenge-Test.jsonl",
    "mmlu/PROVENANCE.md",
    "ethics/commonsense/cm_test.csv",
    "ethics/deontology/deontology_test.csv",
    "ethics/justice/justice_test.csv",
    "ethics/utilitarianism/util_test.csv",
    "ethics/virtue/virtue_test.csv",
    "ethics/PROVENANCE.md",
    "piqa/piqa_validation.llmfoundry.jsonl",
    "winogrande/winogrande_dev.llmfoundry.jsonl",
    "boolq/boolq_dev.llmfoundry.jsonl",
    "strategyqa/bigbench_strategy_qa.llmfoundry.jsonl",
    "truthfulqa/mc_task.json",
    "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt",
)
TASKS = (
    "qeval_arc_easy",
    "qeval_arc_challenge",
    "qeval_ethics_cm",
    "qeval_ethics_deontology",
    "qeval_ethics_justice",
    "qeval_ethics_utilitarianism",
    "qeval_ethics_virtue",
    "qeval_piqa",
    "qeval_winogrande",
    "qeval_boolq",
    "qeval_strategyqa",
    "qeval_strategyqa_cot",
    "qeval_truthfulqa_mc1",
    "qeval_truthfulqa_mc2",
    "qeval_wikitext",
)


@pytest.fixture(autouse=True, scope="module")
def _needs_data() -> None:
    missing = [f for f in DATA_FILES if local_file(f) is None]
    if missing:
        pytest.skip(f"evaluation data {missing} not found under {data_dir()}; set QEVAL_DATA_DIR")


def plugin(relative: str) -> ModuleType:
    """A plugin's helper module, imported from its file as lm-eval's ``!function`` does."""
    return import_plugin_file(BUILTIN_TASKS_DIR / relative)


def _data(relative: str) -> Path:
    path = local_file(relative)
    assert path is not None
    return path


def _provenance_count(folder: str, pattern: str) -> int:
    """A number stated in ``<folder>/PROVENANCE.md`` (e.g. '3,885 rows'), as an int."""
    text = _data(f"{folder}/PROVENANCE.md").read_text(encoding="utf-8")
    match = re.search(pattern, text)
    assert match, f"{folder}/PROVENANCE.md no longer says {pattern!r}"
    return int(match.group(1).replace(",", ""))


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("subset", ["ARC-Easy", "ARC-Challenge"])
def test_arc_loader_keeps_every_question_in_hub_schema(subset: str) -> None:
    path = _data(f"arc/{subset}-Test.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = plugin("nlp/arc/utils.py").load_arc(subset)
    test = ds["test"]
    assert set(test.column_names) == {"id", "question", "choices", "answerKey"}
    assert len(test) == len(lines)
    # lm-eval's config names train/validation: present (for its few-shot sampler), empty offline
    assert set(ds) >= {"train", "validation"}
    for row, raw in zip(test, lines):
        assert row["id"] == raw["id"] and row["question"] == raw["question"]["stem"]
        assert row["choices"]["text"] == [c["text"] for c in raw["question"]["choices"]]
        assert row["answerKey"] in row["choices"]["label"]  # lm-eval's target is its index there


def test_mmlu_loader_reads_every_subject_with_letter_index_answers() -> None:
    utils = plugin("nlp/mmlu/utils.py")
    tests = sorted(_data("mmlu/PROVENANCE.md").parent.glob("test/*_test.csv"))
    n_test = 0
    for path in tests:
        subject = path.name.removesuffix("_test.csv")
        ds = utils.load_mmlu(subject=subject)
        assert set(ds["test"].column_names) == {"question", "subject", "choices", "answer"}
        assert set(ds["test"]["subject"]) == {subject}
        assert all(len(c) == 4 for c in ds["test"]["choices"])
        assert set(ds["test"]["answer"]) <= {0, 1, 2, 3}
        assert len(ds["dev"]) > 0
        n_test += len(ds["test"])
    assert n_test == _provenance_count("mmlu", r"test ([\d,]+) rows")
    # dev (few-shot) files exist for all subjects, professional_law's too
    devs = sorted(tests[0].parent.parent.glob("dev/*_dev.csv"))
    n_dev = sum(len(utils.read_mmlu_csv(p, p.name.removesuffix("_dev.csv"))) for p in devs)
    assert n_dev == _provenance_count("mmlu", r"dev ([\d,]+) rows")
    # the first question of a file round-trips unchanged (csv quoting, no stripping)
    with tests[0].open(encoding="utf-8", newline="") as f:
        first = next(csv.reader(f))
    row = utils.load_mmlu(subject=tests[0].name.removesuffix("_test.csv"))["test"][0]
    assert [row["question"], *row["choices"], "ABCD"[row["answer"]]] == first


def test_mmlu_group_has_one_task_per_local_subject() -> None:
    tm = _task_manager()
    local = {p.name.removesuffix("_test.csv") for p in _data("mmlu/PROVENANCE.md").parent.glob("test/*_test.csv")}
    subtasks = {name.removeprefix("qeval_mmlu_") for name in tm.all_subtasks if name.startswith("qeval_mmlu_")}
    assert subtasks == local


def test_ethics_cm_loader_matches_provenance() -> None:
    ds = plugin("ethics/hendrycks_ethics/utils.py").load_ethics_cm()
    test = ds["test"]
    assert set(test.column_names) == {"label", "input", "is_short", "edited"}
    assert len(test) == _provenance_count("ethics", r"([\d,]+) rows")
    assert sum(test["label"]) == _provenance_count("ethics", r"labels 0:[\d,]+, 1:([\d,]+)")
    assert sum(test["is_short"]) == _provenance_count("ethics", r"is_short True:([\d,]+)")


# subset -> (the PROVENANCE table's file, the Hub config's columns, rows per exact-match group)
ETHICS_SUBSETS = {
    "deontology": ("deontology/deontology_test.csv", {"group_id", "label", "scenario", "excuse"}, 4),
    "justice": ("justice/justice_test.csv", {"group_id", "label", "scenario"}, 4),
    "utilitarianism": ("utilitarianism/util_test.csv", {"activity", "baseline", "rating"}, None),
    "virtue": ("virtue/virtue_test.csv", {"group_id", "label", "scenario", "trait"}, 5),
}


@pytest.mark.parametrize("subset", sorted(ETHICS_SUBSETS))
def test_ethics_subset_loaders_keep_every_row_in_hub_schema(subset: str) -> None:
    relative, columns, group = ETHICS_SUBSETS[subset]
    test = getattr(plugin("ethics/hendrycks_ethics/utils.py"), f"load_ethics_{subset}")()["test"]
    assert set(test.column_names) == columns
    stated = _provenance_count("ethics", rf"`{re.escape(relative)}` \| ([\d,]+) \|")
    assert len(test) == stated
    with _data(f"ethics/{relative}").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    body = rows if subset == "utilitarianism" else rows[1:]  # utilitarianism has no header
    assert len(body) == stated
    if group is not None:
        assert test["group_id"] == [i // group for i in range(len(test))]
        assert test["label"] == [int(r[0]) for r in body]
    if subset == "virtue":  # "sentence [SEP] trait", split as the Hub script does
        assert [f"{s} [SEP] {t}" for s, t in zip(test["scenario"], test["trait"])] == [r[1] for r in body]
    if subset == "utilitarianism":
        assert test["activity"] == [r[0] for r in body] and test["baseline"] == [r[1] for r in body]


def _jsonl(relative: str) -> list[dict]:
    return [json.loads(line) for line in _data(relative).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_piqa_loader_rebuilds_goal_and_solutions() -> None:
    raw = _jsonl("piqa/piqa_validation.llmfoundry.jsonl")
    val = plugin("nlp/piqa/utils.py").load_piqa()["validation"]
    assert len(val) == len(raw) == _provenance_count("piqa", r"([\d,]+) items")
    for row, item in zip(val, raw):
        assert f"Question: {row['goal']}\n" == item["query"]  # lm-eval's prompt is the file's query + "Answer:"
        assert [row["sol1"], row["sol2"]] == item["choices"] and row["label"] == item["gold"]


def test_boolq_loader_splits_passage_and_question() -> None:
    raw = _jsonl("boolq/boolq_dev.llmfoundry.jsonl")
    val = plugin("nlp/boolq/utils.py").load_boolq()["validation"]
    assert len(val) == len(raw) == _provenance_count("boolq", r"([\d,]+) items")
    assert sum(val["label"]) == _provenance_count("boolq", r"([\d,]+) yes")
    for row, item in zip(val, raw):
        assert f"Passage: {row['passage']}\nQuestion: {row['question']}?" == item["query"]
        assert not row["question"].endswith("?") and row["label"] == item["gold"]


def test_strategyqa_loaders_keep_question_and_gold() -> None:
    raw = _jsonl("strategyqa/bigbench_strategy_qa.llmfoundry.jsonl")
    utils = plugin("emergent/strategyqa/utils.py")
    mc, cot = utils.load_strategyqa_mc()["default"], utils.load_strategyqa_cot()["test"]
    assert len(mc) == len(cot) == len(raw) == _provenance_count("strategyqa", r"([\d,]+) items")
    yes = _provenance_count("strategyqa", r"gold 0 \(Yes\): ([\d,]+)")
    assert sum(s == [1, 0] for s in mc["multiple_choice_scores"]) == yes
    assert cot["answer"].count("yes") == yes
    for m, c, item in zip(mc, cot, raw):
        assert m["inputs"] == item["query"] == f"Q: {c['question']}\nA:"
        assert m["multiple_choice_targets"][m["multiple_choice_scores"].index(1)] == item["choices"][item["gold"]]


def test_winogrande_rows_give_lm_evals_choices_and_target() -> None:
    """lm-eval's own winogrande functions, applied to the rebuilt rows, give back the file's
    context options and continuation for every item (the partial-evaluation split)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    raw = _jsonl("winogrande/winogrande_dev.llmfoundry.jsonl")
    val = plugin("nlp/winogrande/utils.py").load_winogrande()["validation"]
    assert len(val) == len(raw) == _provenance_count("winogrande", r"([\d,]+) items")
    ref = load_yaml(_task_manager().task_index["winogrande"].yaml_path, resolve_func=True)
    for row, item in zip(val, raw):
        assert row["sentence"].count("_") == 1
        assert ref["doc_to_choice"](row) == item["context_options"]
        assert ref["doc_to_target"](row) == item["continuation"].strip()
        assert ref["doc_to_text"](row) == item["gold"]


@pytest.mark.parametrize(
    "task, theirs", [("qeval_winogrande", "winogrande"), ("qeval_ethics_utilitarianism", "ethics_utilitarianism")]
)
def test_prompt_functions_equal_lm_evals_on_every_local_item(task: str, theirs: str) -> None:
    """Where the prompt is Python (not a template), qeval's functions return what lm-eval's
    return, item by item over the whole local file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = _task_manager().task_index
    mine, ref = (load_yaml(index[name].yaml_path, resolve_func=True) for name in (task, theirs))
    docs = mine["custom_dataset"]()
    docs = docs[next(s for s in ("validation", "test") if s in docs)]
    keys = [k for k in ("doc_to_text", "doc_to_target", "doc_to_choice") if callable(ref.get(k))]
    assert keys
    for doc in docs:
        for key in keys:
            assert mine[key](doc) == ref[key](doc), (key, doc)


def test_truthfulqa_loader_puts_the_true_mc1_answer_first() -> None:
    items = json.loads(_data("truthfulqa/mc_task.json").read_text(encoding="utf-8"))
    val = plugin("ethics/truthfulqa/utils.py").load_truthfulqa_mc()["validation"]
    assert set(val.column_names) == {"question", "mc1_targets", "mc2_targets"}
    assert len(val) == len(items)
    for row, item in zip(val, items):
        for key in ("mc1_targets", "mc2_targets"):
            assert row[key]["choices"] == list(item[key]) and row[key]["labels"] == list(item[key].values())
        assert row["mc1_targets"]["labels"][0] == 1 and sum(row["mc1_targets"]["labels"]) == 1  # target 0


def test_wikitext_pages_are_the_articles_with_every_line() -> None:
    utils = plugin("nlp/wikitext/utils.py")
    path = _data("wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt")
    lines = [ln for ln in path.read_bytes().decode("utf-8").split("\r\n") if ln.strip()]
    pages = utils.load_wikitext()["test"]["page"]
    assert len(pages) == sum(utils.is_title(ln) for ln in lines)
    assert all(utils.is_title(p.split("\n", 1)[0]) for p in pages)
    rebuilt = [ln for p in pages for ln in p.split("\n") if ln.strip()]
    assert rebuilt == lines  # every text line, in order, unchanged
    # lm-eval's word count (whitespace pieces of the page) sees only the text
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    assert words == sum(len(ln.split()) for ln in lines) + 2 * len(pages)


# ---------------------------------------------------------------- lm-eval


def _task_manager():
    from qeval.eval.registry import task_manager

    return task_manager()


# qeval task -> the lm-eval task whose config it must repeat, data source aside
MIRRORS = {
    "qeval_arc_easy": "arc_easy",
    "qeval_arc_challenge": "arc_challenge",
    "qeval_mmlu_anatomy": "mmlu_anatomy",
    "qeval_mmlu_professional_medicine": "mmlu_professional_medicine",
    "qeval_ethics_cm": "ethics_cm",
    "qeval_ethics_deontology": "ethics_deontology",
    "qeval_ethics_justice": "ethics_justice",
    "qeval_piqa": "piqa",
    "qeval_boolq": "boolq",
    "qeval_ethics_virtue": "ethics_virtue",
    "qeval_truthfulqa_mc1": "truthfulqa_mc1",
    "qeval_truthfulqa_mc2": "truthfulqa_mc2",
    "qeval_wikitext": "wikitext",
}
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "metadata", "tag", "task", "include"}


def _comparable(value):
    """A config value with functions replaced by their name and bytecode (lm-eval re-imports its modules)."""
    if callable(value):
        return (value.__name__, value.__code__.co_code)
    return value


@pytest.mark.parametrize("ours, theirs", MIRRORS.items())
def test_config_is_lm_evals_but_for_the_data(ours: str, theirs: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    index = _task_manager().task_index
    mine, ref = (load_yaml(index[name].yaml_path, resolve_func=True) for name in (ours, theirs))
    assert {k: _comparable(v) for k, v in mine.items() if k not in DATA_KEYS} == {
        k: _comparable(v) for k, v in ref.items() if k not in DATA_KEYS
    }


def test_tasks_build_in_lm_eval_with_qeval_metadata() -> None:
    from qeval.eval.registry import task_info

    loaded = _task_manager().load(list(TASKS))  # the MMLU group is built by its end-to-end test
    for name in TASKS:
        assert len(loaded["tasks"][name].eval_docs) > 0
    expected = {
        "qeval_arc_easy": ("basic_nlp", "acc_norm", True),
        "qeval_mmlu": ("basic_nlp", "acc", True),
        "qeval_ethics_cm": ("ethics", "acc", True),
        "qeval_ethics": ("ethics", "acc", True),
        "qeval_ethics_virtue": ("ethics", "acc", True),
        "qeval_piqa": ("basic_nlp", "acc_norm", True),
        "qeval_winogrande": ("basic_nlp", "acc", True),
        "qeval_boolq": ("basic_nlp", "acc", True),
        "qeval_strategyqa": ("emergent", "acc", True),
        "qeval_strategyqa_cot": ("emergent", "exact_match[strict-match]", True),
        "qeval_truthfulqa_mc2": ("ethics", "acc", True),
        "qeval_wikitext": ("basic_nlp", "word_perplexity", False),
    }
    for name, (family, metric, higher) in expected.items():
        info = task_info(name)
        assert (info.family, info.primary_metric, info.higher_is_better) == (family, metric, higher)


@pytest.fixture(scope="module")
def tiny():
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    return build_tiny_model("llama"), byte_tokenizer()


@pytest.mark.parametrize(
    "task, metrics",
    [
        ("qeval_arc_easy", ("acc", "acc_norm")),
        ("qeval_arc_challenge", ("acc", "acc_norm")),
        ("qeval_ethics_cm", ("acc",)),
        ("qeval_ethics_utilitarianism", ("acc",)),
        ("qeval_piqa", ("acc", "acc_norm")),
        ("qeval_winogrande", ("acc",)),
        ("qeval_boolq", ("acc",)),
        ("qeval_strategyqa", ("acc",)),
        ("qeval_truthfulqa_mc1", ("acc",)),
        ("qeval_truthfulqa_mc2", ("acc",)),
    ],
)
def test_multiple_choice_task_end_to_end(tiny, task: str, metrics: tuple[str, ...]) -> None:
    from qeval.eval.harness import evaluate_lm_eval

    out = evaluate_lm_eval(*tiny, task, limit=2, batch_size=8)
    assert out["samples"] == 2
    for metric in metrics:
        assert 0.0 <= out[metric] <= 1.0 and f"{metric}_stderr" in out


def test_ethics_group_is_the_unweighted_mean_of_its_five_subsets(tiny) -> None:
    from qeval.eval.harness import run_lm_eval

    out = run_lm_eval(*tiny, "qeval_ethics", limit=3, batch_size=8)
    subsets = [f"qeval_ethics_{s}" for s in ("cm", "deontology", "justice", "utilitarianism", "virtue")]
    accs = [out["results"][s]["acc,none"] for s in subsets]
    assert out["results"]["qeval_ethics"]["acc,none"] == pytest.approx(sum(accs) / 5)
    assert all(out["n-samples"][s]["effective"] == 3 for s in subsets)


def test_strategyqa_cot_prompt_and_extraction(tiny) -> None:
    """Six exemplars before the question; strict-match reads the yes/no after the last
    "answer is", flexible-extract the last yes/no anywhere."""
    from qeval.eval.harness import run_lm_eval

    out = run_lm_eval(
        *tiny,
        "qeval_strategyqa_cot",
        limit=2,
        num_fewshot=None,
        batch_size=8,
        log_samples=True,
        gen_kwargs="max_gen_toks=8",
    )
    sample = out["samples"]["qeval_strategyqa_cot"][0]
    prompt = sample["arguments"][0][0]
    assert prompt.count("So the answer is") == 6 and prompt.endswith("Answer:")
    assert out["n-samples"]["qeval_strategyqa_cot"]["effective"] == 2
    from lm_eval.filters.extraction import RegexFilter

    cfg = _task_manager().task_index["qeval_strategyqa_cot"].cfg
    strict, flexible = (
        RegexFilter(f["filter"][0]["regex_pattern"], f["filter"][0]["group_select"]) for f in cfg["filter_list"]
    )
    texts = [
        "Rain is wet.\nSo the answer is yes.",
        "The answer is maybe. So the answer is definitely No.",
        "Nothing, no idea",
        "not sure",
    ]
    assert [r[0] for r in strict.apply([[t] for t in texts], [])] == ["yes", "No", "[invalid]", "[invalid]"]
    assert [r[0] for r in flexible.apply([[t] for t in texts], [])] == ["yes", "No", "no", "[invalid]"]


def test_mmlu_group_end_to_end_counts_every_subject(tiny) -> None:
    from qeval.eval.harness import evaluate_lm_eval

    n_subjects = len(list(_data("mmlu/PROVENANCE.md").parent.glob("test/*_test.csv")))
    out = evaluate_lm_eval(*tiny, "qeval_mmlu", limit=1, batch_size=32)
    assert out["samples"] == n_subjects  # the group's count is the sum over its subjects
    assert 0.0 <= out["acc"] <= 1.0


def test_mmlu_few_shot_count_follows_num_fewshot(tiny) -> None:
    from qeval.eval.harness import run_lm_eval

    dev = plugin("nlp/mmlu/utils.py").load_mmlu(subject="anatomy")["dev"]["question"]
    out = run_lm_eval(*tiny, "qeval_mmlu_anatomy", limit=1, num_fewshot=2, batch_size=8, log_samples=True)
    assert out["n-shot"]["qeval_mmlu_anatomy"] == 2
    prompt = out["samples"]["qeval_mmlu_anatomy"][0]["arguments"][0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert dev[0].strip() in prompt and dev[1].strip() in prompt and dev[2].strip() not in prompt


def test_wikitext_end_to_end(tiny) -> None:
    from qeval.eval.harness import evaluate_lm_eval

    out = evaluate_lm_eval(*tiny, "qeval_wikitext", limit=1, batch_size=8)
    assert out["samples"] == 1
    assert out["word_perplexity"] > 1 and out["byte_perplexity"] > 1
    assert math.isclose(out["bits_per_byte"], math.log2(out["byte_perplexity"]), rel_tol=1e-9)


@pytest.mark.parametrize("task", ["qeval_arc_easy_icl", "qeval_arc_challenge_icl"])
def test_arc_icl_shots_are_other_test_questions(tiny, task: str) -> None:
    """Offline ARC has no train split: the in-context variants draw their 10 shots from the
    other test questions, never the one being asked, before arc's own prompt."""
    from qeval.eval.harness import run_lm_eval
    from qeval.eval.registry import task_info

    assert task_info(task).family == "emergent"
    out = run_lm_eval(*tiny, task, limit=2, num_fewshot=10, batch_size=8, log_samples=True)
    assert out["n-shot"][task] == 10
    for sample in out["samples"][task]:
        prompt = sample["arguments"][0][0]
        asked = sample["doc"]["question"]
        assert prompt.count("Question: ") == 11  # ten shots, then the question itself
        assert prompt.endswith(f"Question: {asked}\nAnswer:")
        assert prompt.count(f"Question: {asked}\n") == 1
