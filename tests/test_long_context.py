"""The long-context tasks: LongEval line/topic retrieval and needle in a haystack.

Generators must be deterministic (every cell of a sweep must see the same prompts) and
reproduce LongChat's format; lengths that don't fit the context window must be skipped
with a note, not crash; and each task must run end to end on a tiny random model.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from qeval.data import data_dir, local_file
from qeval.eval.generation import context_limit, encode_prompt
from qeval.eval.registry import TaskContext, TaskDataError, discover_native
from qeval.eval.scores import mean_stderr
from qeval.models.tiny import build_tiny_model, byte_tokenizer
from qeval.tasks.long_context import longeval_gen as lg

NEEDED = (
    "longeval/lines/200_lines.jsonl",
    "longeval/topics/conversations.jsonl",
    "longeval/topics/1_topics.jsonl",
    "needle_haystack/PaulGrahamEssays/addiction.txt",
)


@pytest.fixture(scope="module", autouse=True)
def _require_data():
    missing = [f for f in NEEDED if local_file(f) is None]
    if missing:
        pytest.skip(f"long-context data {missing} not found under {data_dir()}; set QEVAL_DATA_DIR")


@pytest.fixture(scope="module")
def tasks():
    return discover_native()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny(window: int):
    """A tiny llama whose context window is ``window`` tokens (rotary: no table to resize)."""
    model = build_tiny_model("llama")
    model.config.max_position_embeddings = window
    return model


def ctx(model, tok, limit=2, seed=0):
    return TaskContext(model=model, tokenizer=tok, seed=seed, limit=limit)


# ------------------------------------------------------------------ generators


def test_lines_generator_is_deterministic_and_in_longchat_format():
    a = lg.lines_cases(20, 3, seed=1, prefer_local=False)
    assert a == lg.lines_cases(20, 3, seed=1, prefer_local=False)
    assert a != lg.lines_cases(20, 3, seed=2, prefer_local=False)
    for case in a:
        assert case.prompt.startswith(lg.LINES_HEADER)
        assert case.prompt.endswith(lg.LINES_QUESTION.format(index=case.target))
        lines = lg.LINE_PATTERN.findall(case.prompt)
        assert len(lines) == 20 and len({name for name, _ in lines}) == 20
        assert case.prompt.count(f"line {case.target}: REGISTER_CONTENT is <{case.answer}>\n") == 1
        assert case.prompt.count(f"line {case.target}:") == 1
        assert all(1 <= int(v) <= lg.MAX_REGISTER for _, v in lines)
    # a second length does not change the first one's cases
    assert lg.lines_cases(20, 3, seed=1, prefer_local=False)[0] == a[0]


def test_the_format_constants_rebuild_longchats_shipped_records():
    shipped = lg.local_lines_cases(200)
    assert shipped is not None and len(shipped) == 50
    for case in shipped[:10]:
        body = "".join(f"line {n}: REGISTER_CONTENT is <{v}>\n" for n, v in lg.LINE_PATTERN.findall(case.prompt))
        assert case.prompt == lg.LINES_HEADER + body + lg.LINES_QUESTION.format(index=case.target)
        assert f"line {case.target}: REGISTER_CONTENT is <{case.answer}>" in case.prompt
    # sizes with a shipped file read it; others are generated
    assert lg.lines_cases(200, 2)[0].source == "local"
    assert lg.lines_cases(7, 2)[0].source == "generated"


def test_topics_generator_rebuilds_shipped_records_and_is_deterministic():
    convs = dict(lg.conversations())
    for rec in lg.read_jsonl(local_file("longeval/topics/1_topics.jsonl"))[:5]:
        assert lg.topics_prompt([(t, convs[t]) for t in rec["topics"]]) == rec["prompt"]
    a = lg.topics_cases(3, 2, seed=4, prefer_local=False)
    assert a == lg.topics_cases(3, 2, seed=4, prefer_local=False)
    for case in a:
        assert case.prompt.count("USER: I would like to discuss the topic of") == 3
        assert case.prompt.startswith(lg.TOPICS_HEADER.format(n=3)) and case.prompt.endswith(lg.TOPICS_QUESTION)


def test_prompt_length_grows_with_lines_topics_and_context_length(tok):
    def length(case):
        return len(encode_prompt(tok, case.prompt, False))

    lines = [length(lg.lines_cases(n, 1, prefer_local=False)[0]) for n in (5, 10, 20)]
    assert lines[0] < lines[1] < lines[2]
    topics = [length(lg.topics_cases(n, 1, prefer_local=False)[0]) for n in (1, 2, 3)]
    assert topics[0] < topics[1] < topics[2]
    haystack = tok(lg.essays_text(), add_special_tokens=False).input_ids
    needles = [lg.needle_case(tok, haystack, n, 0.5, random.Random(0)) for n in (100, 200, 400)]
    sizes = [
        len(tok(c.prompt.split("\n\n" + lg.NEEDLE_QUESTION)[0], add_special_tokens=False).input_ids) for c in needles
    ]
    assert sizes[0] < sizes[1] < sizes[2]
    for want, got in zip((100, 200, 400), sizes):
        assert abs(got - want) <= 2  # byte tokens: the filler is cut at the token count


def test_needle_is_placed_once_at_the_requested_depth(tok):
    haystack = tok(lg.essays_text(), add_special_tokens=False).input_ids
    first = lg.needle_case(tok, haystack, 300, 0.0, random.Random(3))
    assert first == lg.needle_case(tok, haystack, 300, 0.0, random.Random(3))
    needle = lg.NEEDLE.format(key=first.answer)
    assert first.prompt.startswith(needle) and first.prompt.count(needle) == 1
    assert len(first.answer) == 4
    last = lg.needle_case(tok, haystack, 300, 1.0, random.Random(3))
    assert last.prompt.endswith(lg.NEEDLE.format(key=last.answer) + "\n\n" + lg.NEEDLE_QUESTION)
    mid = lg.needle_case(tok, haystack, 2000, 0.5, random.Random(5), key_digits=6)
    text = mid.prompt.split("\n\n" + lg.NEEDLE_QUESTION)[0]
    at = text.index(lg.NEEDLE.format(key=mid.answer))
    assert 0.25 < at / len(text) <= 0.5  # the last sentence end before the middle
    assert text[:at].rstrip()[-1] in ".!?\"')]" and len(mid.answer) == 6


def test_sentence_boundary():
    text = "One. Two? Three!Four and more"
    assert lg.sentence_boundary(text, 0) == 0
    assert lg.sentence_boundary(text, 7) == 4
    assert lg.sentence_boundary(text, len(text)) == text.index("Four")


# ------------------------------------------------------------------ scoring


def test_number_extraction_first_and_last():
    out = "The <REGISTER_CONTENT> is <2416>. line 3 has 17"
    assert lg.extract_number(out, "first") == "2416"
    assert lg.extract_number(out, "last") == "17"  # LongChat's rule
    assert lg.extract_number("no digits here") is None
    assert lg.number_correct("2416>\n\nline foo-bar: REGISTER_CONTENT is <31", "2416")
    assert not lg.number_correct("2416>\n\nline foo-bar: REGISTER_CONTENT is <31", "2416", "last")
    assert lg.number_correct(" 02416.", "2416") and not lg.number_correct("24160", "2416")
    assert not lg.number_correct("", "2416")
    with pytest.raises(ValueError):
        lg.extract_number("1", "middle")


def test_topic_match_is_normalised_containment():
    topic = "The impact of social media on communication"
    assert lg.topic_correct(" the impact of social media on communication.", topic)
    assert lg.topic_correct('"Impact of Social-Media on communication"', topic)
    assert not lg.topic_correct("the impact of social media", topic)
    assert not lg.topic_correct("", topic)


def test_mean_stderr_and_context_limit():
    mean, se, n = mean_stderr([1, 0, 1, 1])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4)) and n == 4
    assert math.isnan(mean_stderr([1])[1])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    assert context_limit(model, 8) == 504
    assert context_limit(model, 8, max_tokens=300) == 292


# ------------------------------------------------------------------ tasks end to end


def check_items(c: TaskContext, m: dict, unit: str = "") -> dict:
    """The per-item table of a long-context evaluation agrees with its metrics: one row per scored
    case, unique ids, ``acc`` (0/1) only at ``acc_at`` and averaging to the reported ``acc``,
    ``correct`` averaging to every length's ``acc@<n>``, short answers."""
    items = c.items
    assert items is not None and set(items) >= {"id", "acc", "correct", "size", "answer", "expected"}
    assert all(len(col) == m["samples"] for col in items.values())
    assert len(set(items["id"])) == len(items["id"])
    assert all(v in (0, 1) for v in items["correct"])
    assert all((a is None) == (n != m["acc_at"]) for a, n in zip(items["acc"], items["size"]))
    if m["samples"]:
        assert mean_stderr(items["acc"])[0] == pytest.approx(m["acc"], abs=1e-9)
    for n in set(items["size"]):
        correct = [v for v, size in zip(items["correct"], items["size"]) if size == n]
        assert sum(correct) / len(correct) == pytest.approx(m[f"acc@{n}{unit}"], abs=1e-9)
    assert all(a is None or len(a) <= 80 for a in items["answer"])
    return items


def test_tasks_are_registered_in_the_long_context_family(tasks):
    for name in ("qeval_longeval_lines", "qeval_longeval_topics", "qeval_needle"):
        assert tasks[name].family == "long_context" and tasks[name].primary_metric == "acc"
    with pytest.raises(TypeError, match="extract"):
        tasks["qeval_longeval_lines"](extract="middle")
    with pytest.raises(TypeError, match="depths"):
        tasks["qeval_needle"](depths=[1.5])
    with pytest.raises(TypeError):
        tasks["qeval_needle"](no_such_param=1)


def test_lines_end_to_end_with_capping(tasks, tok):
    # a 1-line prompt is ~520 byte tokens, a 4-line one ~700: a 640-token window fits only the first
    task = tasks["qeval_longeval_lines"](num_lines=[1, 4], max_new_tokens=4)
    small = ctx(tiny(640), tok)
    m = task.evaluate(small)
    assert set(m) >= {
        "acc",
        "acc_stderr",
        "acc_at",
        "acc@1lines",
        "acc@1lines_stderr",
        "context_tokens@1lines",
        "skipped@4lines",
        "max_prompt_tokens",
        "samples",
    }
    assert "acc@4lines" not in m and m["skipped@4lines"] > m["max_prompt_tokens"] == 636
    assert m["acc_at"] == 1 and m["acc"] == m["acc@1lines"] and m["samples"] == 2
    assert 0 <= m["acc"] <= 1
    capped_items = check_items(small, m, "lines")
    assert capped_items["id"] == ["1lines/0", "1lines/1"] and capped_items["acc"] == capped_items["correct"]
    # the same lengths in a large window: both tested, primary metric at the longest
    large = ctx(tiny(4096), tok)
    m = task.evaluate(large)
    assert m["acc_at"] == 4 and m["samples"] == 4 and "skipped@4lines" not in m
    assert m["context_tokens@1lines"] < m["context_tokens@4lines"]
    items = check_items(large, m, "lines")
    assert items["id"] == ["1lines/0", "1lines/1", "4lines/0", "4lines/1"]
    assert items["acc"][:2] == [None, None] and items["acc"][2:] == items["correct"][2:]
    # the 1-line cases are the same items in both cells (same ids, same model weights: same answers)
    for col in ("id", "correct", "answer", "expected", "prompt_tokens"):
        assert items[col][:2] == capped_items[col]
    assert all(e.isdigit() for e in items["expected"])
    assert all(a is None or a.isdigit() for a in items["answer"])  # the extracted number
    # a max_tokens budget caps like a window does
    capped = tasks["qeval_longeval_lines"](num_lines=[1, 4], max_new_tokens=4, max_tokens=640)
    assert "skipped@4lines" in capped.evaluate(ctx(tiny(4096), tok, limit=1))


def test_nothing_fits_gives_nan_not_a_crash(tasks, tok):
    c = ctx(tiny(128), tok)
    m = tasks["qeval_longeval_lines"](num_lines=[3]).evaluate(c)
    assert math.isnan(m["acc"]) and m["samples"] == 0 and m["skipped@3lines"] > 120
    assert c.items is not None and c.items["id"] == [] and c.items["acc"] == []  # no case scored, no row


def test_topics_end_to_end(tasks, tok):
    c = ctx(tiny(8192), tok, limit=1)
    m = tasks["qeval_longeval_topics"](num_topics=[1], max_new_tokens=4).evaluate(c)
    assert {"acc", "acc@1topics", "context_tokens@1topics", "samples"} <= set(m) and m["samples"] == 1
    items = check_items(c, m, "topics")
    assert items["id"] == ["1topics/0"] and items["acc"] == [int(m["acc"])]
    assert items["expected"] == [lg.topics_cases(1, 1, data_dir=None)[0].answer[:80]]


def test_needle_end_to_end_with_capping(tasks, tok):
    task = tasks["qeval_needle"](context_lengths=[64, 128, 600], depths=[0.0, 1.0], max_new_tokens=4)
    first = ctx(tiny(512), tok)
    m = task.evaluate(first)  # 600 tokens don't fit 512
    assert {
        "acc",
        "acc_at",
        "acc@64",
        "acc@128",
        "acc@128_stderr",
        "acc@64_d0",
        "acc@128_d100",
        "context_tokens@128",
        "skipped@600",
        "samples",
    } <= set(m)
    assert m["acc_at"] == 128 and m["acc"] == m["acc@128"] and m["samples"] == 2 * 2 * 2
    assert m["context_tokens@64"] < m["context_tokens@128"] < 512
    items = check_items(first, m)
    assert items["id"] == [f"{n}/d{d}/{i}" for n in (64, 128) for d in (0, 100) for i in (0, 1)]
    assert items["depth"] == [d for _ in (64, 128) for d in (0.0, 1.0) for _ in (0, 1)]
    for n in (64, 128):
        for d in (0, 100):
            rows = [c for c, i in zip(items["correct"], items["id"]) if i.startswith(f"{n}/d{d}/")]
            assert sum(rows) / len(rows) == pytest.approx(m[f"acc@{n}_d{d}"], abs=1e-9)
    assert all(len(e) == 4 and e.isdigit() for e in items["expected"])  # the 4-digit keys
    # a second evaluation (another cell; here with one case per setting) keeps the same items
    # under the same ids: case 0 of every setting, with the same outcome
    second = ctx(tiny(512), tok, limit=1)
    task.evaluate(second)
    assert second.items is not None and second.items["id"] == [f"{n}/d{d}/0" for n in (64, 128) for d in (0, 100)]
    for col, values in second.items.items():
        assert values == [v for v, i in zip(items[col], items["id"]) if i.endswith("/0")], col


def test_needle_without_essays_is_a_clear_error(tasks, tmp_path, monkeypatch):
    """Offline with no essays (local or cached): the error names them and the fetch command."""
    monkeypatch.setenv("QEVAL_OFFLINE", "1")
    monkeypatch.setenv("QEVAL_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TaskDataError, match=r"needle_haystack/PaulGrahamEssays/\*\.txt.*qeval-data fetch"):
        tasks["qeval_needle"]().check_available(str(tmp_path))


def test_suite_entry_params_reach_the_task():
    """A native suite entry (kind auto, limit, params) runs through evaluate_suite."""
    from hydra import compose, initialize_config_dir

    from qeval.cell import build_cell
    from qeval.cli import CONF_DIR
    from qeval.eval.suite import check_suite, evaluate_suite
    from qeval.models.loading import load_model
    from qeval.runner import eval_settings

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=tiny-llama",
                "suite=tiny",
                "~suite.tasks.wikitext2",
                "~suite.tasks.lambada",
                "+tasks.add.needle={task: qeval_needle, limit: 1, params: {context_lengths: [48, 96], depths: [0.5]}}",
            ],
        )
    cell = build_cell(cfg)  # types the entry as a TaskEntry, as the runner does
    check_suite(cell.suite, cell.include, cell.data_dir)
    loaded = load_model(cell.model)
    metrics = evaluate_suite(loaded.model, loaded.tokenizer, cell.suite, eval_settings(cell)).metrics
    assert metrics["needle"]["acc_at"] == 96 and metrics["needle"]["samples"] == 2
