"""Dialogue family: degeneration metrics on hand-made texts, the MT-Bench task end to end on a tiny
model (plain-text fallback, chat template, FP-answer cache), and the optional LLM judge against a
stub OpenAI-compatible server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from qeval.eval import dialogue, judge
from qeval.eval.registry import TaskContext, TaskDataError, discover_native, short_text
from qeval.eval.scores import mean_stderr

DATA = "mt_bench/question.jsonl"


# --------------------------------------------------------------------------- metrics


def test_sentence_repetition_counts_repeats_after_the_first():
    assert dialogue.sentence_repetition("I like cats. I like cats. I like cats.") == pytest.approx(2 / 3)
    # case, whitespace, list markers and the final punctuation are normalised away
    assert dialogue.sentence_repetition("- Go  home!\n2. go home\nStay.") == pytest.approx(1 / 3)
    assert dialogue.sentence_repetition("One. Two. Three.") == 0.0
    assert math.isnan(dialogue.sentence_repetition(""))


def test_repeated_ngram_ratio_and_distinct():
    distinct = "the quick brown fox jumps over a lazy dog"
    assert dialogue.repeated_ngram_ratio(distinct, 4) == 0.0
    assert dialogue.distinct_n(distinct, 1) == 1.0
    # 5 bigrams (ab, ba, ab, ba, ab), 2 of them distinct
    assert dialogue.repeated_ngram_ratio("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert dialogue.distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    # 6 tokens, 2 distinct words
    assert dialogue.distinct_n("a b a b a b", 1) == pytest.approx(2 / 6)
    # a symbol loop is a token loop: 8 "!" tokens, 5 identical 4-grams
    assert dialogue.repeated_ngram_ratio("!!!!!!!!", 4) == pytest.approx(1 - 1 / 5)
    assert math.isnan(dialogue.repeated_ngram_ratio("too short", 4))


def test_word_tokens_keep_apostrophes_and_split_symbols():
    assert dialogue.word_tokens("Don't STOP, now!!") == ["don't", "stop", ",", "now", "!", "!"]


@pytest.mark.parametrize(
    "word",
    [
        "hello",
        "Hello,",
        "don't",
        "and/or",
        "H2O",
        "COVID-19",
        "4th",
        "MP3s",
        "HTTPS",
        "iPhone",
        "JavaScript",
        "naïve",
        "πr²",
        "internationalization",
        "(e.g.",
        "https://example.com/a_b",
        "1,000th",
        "shèng",
        "12345",
        # maths, markup and identifiers in prose
        "x^2",
        "f(x)=2x+3.",
        "(√(a^2",
        "πr^2,",
        "<h1>Title",
        'class="story">',
        "my_var",
        "os.path.join()",
        "arr[i]",
        "a",
        "I,",
    ],
)
def test_plausible_words_are_not_nonwords(word):
    assert not dialogue.is_nonword(word)


@pytest.mark.parametrize(
    "word",
    [
        "fo$o",
        "wor:d",
        "soft\ufffdplace",
        "(<[c']}edP",
        "a1b2",
        "aaaa",
        "thethethe",
        "understandingthatthisisit",
        "bcdfgk",
        "wordпри",
        "tHeCaTs",
        "C.",
        "H",
    ],
)
def test_degenerate_tokens_are_nonwords(word):
    assert dialogue.is_nonword(word)


def test_nonword_rate_ignores_code_and_numbers():
    text = "Use `my_var` here:\n```python\nx_1 = f(y)\n```\nthen zzzzz 42 done"
    # prose words: Use, here:, then, zzzzz, done -> one non-word in five
    assert dialogue.prose_words(text) == ["Use", "here:", "then", "zzzzz", "done"]
    assert dialogue.nonword_rate(text) == pytest.approx(1 / 5)
    assert math.isnan(dialogue.nonword_rate("123 456"))


def test_degeneration_counts_repeats_and_nonwords_on_one_token_scale():
    assert dialogue.degeneration("the quick brown fox jumps") == 0.0
    # the second copy (4 of 8 tokens) repeats the first
    assert dialogue.degeneration("one two three four one two three four") == pytest.approx(4 / 8)
    # lone letters other than a/I are non-words: 3 of 4 tokens
    assert dialogue.degeneration("C C. I") == pytest.approx(3 / 4)
    # a sentence said three times: the last two copies, like sentence repetition
    text = "I like cats. I like cats. I like cats."
    assert dialogue.degeneration(text) == pytest.approx(dialogue.sentence_repetition(text)) == pytest.approx(2 / 3)
    # "zzzzz" is a non-word: 1 of 2 tokens; code is exempt from the non-word test
    assert dialogue.degeneration("zzzzz is") == pytest.approx(1 / 2)
    assert dialogue.degeneration("`zzzzz` is") == 0.0
    # gibberish without a single repeat: rep-4 sees nothing, degeneration does
    gibberish = "breuclear soft$place collabwicD4x9 aaaah thethethe"
    assert dialogue.repeated_ngram_ratio(gibberish, 4) == 0.0
    assert dialogue.degeneration(gibberish) > 0.5
    assert dialogue.degeneration("") == 1.0 and dialogue.degeneration("  \n ") == 1.0


def test_rouge_l_agreement():
    assert dialogue.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert dialogue.rouge_l("dogs bark", "the cat sat") == 0.0
    assert dialogue.rouge_l("", "") == 1.0
    # LCS "a c" of length 2 in 3 and 4 tokens: P 2/3, R 2/4, F1 = 2PR/(P+R)
    p, r = 2 / 3, 2 / 4
    assert dialogue.rouge_l("a b c", "a x c y") == pytest.approx(2 * p * r / (p + r))


def test_mean_stderr_and_aggregate():
    mean, err, n = mean_stderr([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3)
    assert err == pytest.approx(1.0 / math.sqrt(3))  # sample std 1
    assert math.isnan(mean_stderr([5.0])[1])
    agg = dialogue.aggregate([{"x": 0.0}, {"x": 1.0}], "turn1_")
    assert agg == {"turn1_x": 0.5, "turn1_x_stderr": pytest.approx(0.5)}


# --------------------------------------------------------------------------- the task on a tiny model


@pytest.fixture(scope="module")
def mt_bench():
    from qeval.data import local_file

    if local_file(DATA) is None:
        pytest.skip(f"{DATA} not under the data directory; set QEVAL_DATA_DIR")
    return discover_native()["qeval_mt_bench"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a busy machine oversubscribed OpenMP
    threads make each generate step many times slower; restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    return build_tiny_model("llama", seed=0), build_tiny_model("llama", seed=1), byte_tokenizer()


class CountingGenerate:
    """Wraps ``model.generate`` to count calls (the reference must not be called on a cache hit)."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        inner = model.generate

        def generate(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(model, "generate", generate)


def _ctx(model, ref, tok, cache_dir, **kw):
    return TaskContext(
        model=model,
        tokenizer=tok,
        seed=0,
        limit=2,
        reference=ref,
        reference_fingerprint="tinyref",
        cache_dir=cache_dir,
        extra={"batch_size": 2},
        **kw,
    )


ANSWER_METRICS = ("degeneration", "rep4", "sentence_rep", "distinct1", "distinct2", "nonword", "length", "empty")


def check_items(ctx: TaskContext, m: dict) -> dict:
    """MT-Bench's per-item table agrees with its metrics: one row per question and turn, each
    per-answer column's mean (undefined values left out) is the reported mean, overall and per turn."""
    items = ctx.items
    assert items is not None and len(items["id"]) == m["samples"]
    assert len(set(items["id"])) == len(items["id"])
    assert items["id"] == [f"{q}/t{t}" for q, t in zip(items["question_id"], items["turn"])]
    for key in (*ANSWER_METRICS, "unfinished", "rougeL_fp", "judge_score"):
        if key not in m:
            assert key not in items
            continue
        assert all(v is None or isinstance(v, float) and not math.isnan(v) for v in items[key])
        for prefix, turn in (("", None), ("turn1_", 1), ("turn2_", 2)):
            values = [v for v, t in zip(items[key], items["turn"]) if turn in (None, t)]
            assert mean_stderr(values)[0] == pytest.approx(m[prefix + key], abs=1e-9, nan_ok=True), prefix + key
    assert all(isinstance(a, str) and len(a) <= 80 for a in items["answer"])
    return items


def test_task_plain_fallback_metrics_and_reference_cache(mt_bench, tiny, tmp_path, monkeypatch):
    ref, quant, tok = tiny
    assert not getattr(tok, "chat_template", None)  # the byte tokenizer has none: the fallback path
    counter = CountingGenerate(ref, monkeypatch)
    task = mt_bench(max_new_tokens=8)
    ctx = _ctx(quant, ref, tok, tmp_path)
    first = task.evaluate(ctx)
    assert counter.calls == 2  # one batch per turn for the FP answers
    assert first["samples"] == 4 and first["chat_template"] == 0.0
    for key in (
        "degeneration",
        "rep4",
        "sentence_rep",
        "distinct1",
        "distinct2",
        "nonword",
        "rougeL_fp",
        "unfinished",
        "empty",
        "length",
    ):
        for prefix in ("", "turn1_", "turn2_"):
            assert f"{prefix}{key}" in first and f"{prefix}{key}_stderr" in first
    assert 0.0 <= first["rougeL_fp"] <= 1.0
    files = list(tmp_path.glob("mt_bench-*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    assert cached["key"]["reference_fingerprint"] == "tinyref" and cached["key"]["question_ids"] == [81, 82]
    assert set(cached["answers"]) == {"81", "82"}
    items = check_items(ctx, first)
    assert items["id"] == ["81/t1", "81/t2", "82/t1", "82/t2"] and items["category"] == ["writing"] * 4
    full = [answer for both in task.last_answers for answer in both]  # [question][turn], flattened
    assert items["degeneration"] == [dialogue.degeneration(a) for a in full]
    assert items["answer"] == [short_text(a) for a in full]
    # a second cell reuses the cached FP answers: the reference model is not called again
    again = _ctx(quant, ref, tok, tmp_path)
    second = mt_bench(max_new_tokens=8).evaluate(again)
    assert counter.calls == 2
    assert second == first
    assert again.items == items  # the same items, ids and values
    # other generation settings are another cache entry
    mt_bench(max_new_tokens=4).evaluate(_ctx(quant, ref, tok, tmp_path))
    assert counter.calls == 4 and len(list(tmp_path.glob("mt_bench-*.json"))) == 2


def test_task_reference_cell_agrees_with_itself_and_fills_the_cache(mt_bench, tiny, tmp_path, monkeypatch):
    ref, quant, tok = tiny
    ctx = _ctx(ref, None, tok, tmp_path, is_reference=True)
    m = mt_bench(max_new_tokens=8).evaluate(ctx)
    assert m["rougeL_fp"] == 1.0 and m["rougeL_fp_stderr"] == 0.0
    assert check_items(ctx, m)["rougeL_fp"] == [1.0] * 4
    # the FP cell stored its own answers: a quantized cell needs no reference generation
    counter = CountingGenerate(ref, monkeypatch)
    mt_bench(max_new_tokens=8).evaluate(_ctx(quant, ref, tok, tmp_path))
    assert counter.calls == 0


def test_items_of_undefined_values_and_unparsed_ratings(mt_bench):
    """An empty answer's undefined metrics (NaN) and an unparsed judge rating are None in the items;
    the per-item means still give the reported metrics."""
    qs = [{"question_id": 81, "category": "writing"}, {"question_id": 82, "category": "writing"}]
    answers = [["", "Fine words here. " * 10], ["One two three four one two three four", "x"]]
    per_turn = [[dialogue.answer_metrics(answers[k][t]) for k in range(2)] for t in range(2)]
    ctx = TaskContext(model=None, tokenizer=None)
    ctx.keep_items(**mt_bench.items(qs, answers, per_turn, ratings=[[None, 5.0], [8.0, None]]))
    items = ctx.items
    assert items is not None and items["id"] == ["81/t1", "81/t2", "82/t1", "82/t2"] and items["turn"] == [1, 2, 1, 2]
    assert items["judge_score"] == [None, 5.0, 8.0, None]
    assert items["rep4"][0] is None and items["degeneration"][0] == 1.0 and items["empty"][0] == 1.0
    assert items["degeneration"][2] == 0.5 and items["answer"][1] == short_text(answers[0][1])
    assert len(items["answer"][1]) == 80 and items["answer"][1].endswith("…")
    reported = dialogue.aggregate(per_turn[0] + per_turn[1])
    for key in ("degeneration", "rep4", "distinct2", "nonword"):
        assert mean_stderr(items[key])[0] == pytest.approx(reported[key], abs=1e-9)


def module_categories(task_cls):
    from importlib import import_module

    return import_module(task_cls.__module__).CATEGORIES


def test_task_chat_template_and_categories(mt_bench, tiny, tmp_path):
    ref, quant, tok = tiny
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    task = mt_bench(max_new_tokens=4, categories=["math"])
    qs = task.questions(limit=2)
    assert [q["category"] for q in qs] == ["math", "math"]
    spread = mt_bench(per_category=1).questions()
    assert sorted(q["category"] for q in spread) == sorted(module_categories(mt_bench))
    from importlib import import_module

    module = import_module(type(task).__module__)
    text = tok.decode(module.prompt_ids(tok, [{"role": "user", "content": "hi"}], chat=True))
    assert text == "<user>hi\n<assistant>"
    m = task.evaluate(_ctx(quant, ref, tok, tmp_path))
    assert m["chat_template"] == 1.0 and m["samples"] == 4


def test_task_rejects_bad_params_and_missing_data(mt_bench, tmp_path, monkeypatch):
    from qeval.config import ConfigError

    with pytest.raises(ConfigError, match="categories"):
        mt_bench(categories=["poetry"])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        mt_bench(max_new_tokens=0)
    with pytest.raises(ConfigError, match="per_category"):
        mt_bench(per_category=0)
    with pytest.raises(TypeError):
        mt_bench(temperature=0.7)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QEVAL_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TaskDataError, match="mt_bench/question.jsonl.*qeval-data fetch"):
        mt_bench().check_available(str(tmp_path))


# --------------------------------------------------------------------------- the judge


class _StubJudge(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = {"choices": [{"message": {"role": "assistant", "content": "Fine answer. Rating: [[7]]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_judge():
    _StubJudge.requests = []
    server = HTTPServer(("127.0.0.1", 0), _StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", _StubJudge.requests
    server.shutdown()
    server.server_close()


def test_parse_rating():
    assert judge.parse_rating("blah Rating: [[7]]") == 7.0
    assert judge.parse_rating("Rating: [8.5]") == 8.5
    assert judge.parse_rating("no rating") is None


def test_judge_prompts_follow_mt_bench(mt_bench):
    from qeval.data import local_file

    prompts = judge.load_judge_prompts(local_file("mt_bench/judge_prompts.jsonl"))
    refs = judge.load_reference_answers(local_file("mt_bench/reference_answer_gpt-4.jsonl"))
    qs = {q["question_id"]: q for q in mt_bench().questions()}
    name, system, user = judge.single_prompt(prompts, qs[81], ["A1", "A2"], 1)
    assert name == "single-v1" and "[Question]\n" + qs[81]["turns"][0] in user and "A1" in user
    name, _, user = judge.single_prompt(prompts, qs[111], ["A1", "A2"], 2, refs[111])
    assert name == "single-math-v1-multi-turn" and refs[111][1] in user and "A2" in user
    with pytest.raises(judge.JudgeError, match="reference"):
        judge.single_prompt(prompts, qs[111], ["A1", "A2"], 1, None)


def test_judge_scores_through_an_openai_compatible_endpoint(mt_bench, tiny, tmp_path, stub_judge, monkeypatch):
    url, requests = stub_judge
    monkeypatch.setenv("MY_JUDGE_KEY", "secret")
    ref, quant, tok = tiny
    task = mt_bench(max_new_tokens=4, judge={"base_url": url, "model": "stub-judge", "api_key_env": "MY_JUDGE_KEY"})
    ctx = _ctx(quant, ref, tok, tmp_path)
    m = task.evaluate(ctx)
    assert m["judge_score"] == 7.0 and m["turn1_judge_score"] == 7.0 and m["turn2_judge_score"] == 7.0
    assert check_items(ctx, m)["judge_score"] == [7.0] * 4
    assert m["judge_score_stderr"] == 0.0 and m["judge_unparsed"] == 0.0
    assert len(requests) == 4  # 2 questions x 2 turns
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "stub-judge" for r in requests)
    assert requests[0]["auth"] == "Bearer secret" and requests[0]["body"]["temperature"] == 0.0


def test_no_judge_no_request(mt_bench, tiny, tmp_path, stub_judge, monkeypatch):
    _, requests = stub_judge
    for var in ("QEVAL_JUDGE_BASE_URL", "QEVAL_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    ref, quant, tok = tiny
    assert judge.judge_config(None) is None
    ctx = _ctx(quant, ref, tok, tmp_path)
    m = mt_bench(max_new_tokens=4).evaluate(ctx)
    assert "judge_score" not in m and requests == []
    assert ctx.items is not None and "judge_score" not in ctx.items


def test_judge_from_environment_and_clear_errors(stub_judge, monkeypatch):
    url, requests = stub_judge
    cfg = judge.judge_config(None, {"QEVAL_JUDGE_BASE_URL": url, "QEVAL_JUDGE_MODEL": "m"})
    assert cfg is not None and cfg.model == "m" and cfg.url == url + "/chat/completions"
    assert judge.chat(cfg, "sys", "hello") == "Fine answer. Rating: [[7]]"
    assert requests[-1]["body"]["messages"][0] == {"role": "system", "content": "sys"}
    dead = judge.JudgeConfig(base_url="http://127.0.0.1:9/v1", timeout=2, retries=0)
    with pytest.raises(judge.JudgeError, match=r"http://127\.0\.0\.1:9/v1/chat/completions"):
        judge.chat(dead, "", "x")
    with pytest.raises(TypeError, match="unknown judge settings"):
        judge.judge_config({"base_url": url, "url": url})


def test_suite_entry_reaches_the_task(mt_bench, tiny, tmp_path):
    """A ``kind: auto`` suite entry with limit, batch_size and params runs the native task; the
    suite's FP cell (quant=fp16) is the reference and fills the cache a quantized cell reads."""
    from hydra import compose, initialize_config_dir

    from qeval.cell import build_cell
    from qeval.cli import CONF_DIR
    from qeval.eval.suite import check_suite, describe_suite, evaluate_suite
    from qeval.runner import eval_settings

    ref, quant, tok = tiny
    entry = "+tasks.add.chat={task: qeval_mt_bench, limit: 1, batch_size: 1, params: {max_new_tokens: 4}}"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=tiny-llama",
                "suite=tiny",
                "~suite.tasks.wikitext2",
                "~suite.tasks.lambada",
                entry,
                f"results_dir={tmp_path}",
            ],
        )
    cell = build_cell(cfg)
    check_suite(cell.suite, cell.include, cell.data_dir)
    info = describe_suite(cell.suite)["chat"]
    assert info == {
        "task": "qeval_mt_bench",
        "kind": "native",
        "family": "dialogue",
        "primary_metric": "degeneration",
        "higher_is_better": False,
        "item_outcome": "degeneration",  # what the paired analysis compares, per answer
        "item_higher_is_better": False,
    }
    metrics = evaluate_suite(
        ref, tok, cell.suite, eval_settings(cell), reference=ref, reference_fingerprint="tinyref"
    ).metrics
    assert metrics["chat"]["samples"] == 2 and metrics["chat"]["rougeL_fp"] == 1.0
    assert len(list((tmp_path / ".reference").glob("mt_bench-*.json"))) == 1
