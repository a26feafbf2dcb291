"""Reasoning models on generation tasks: reading one continuation (reasoning block, answer,
length, truncation, loops) on scripted outputs, the summary metrics, the settings' checks,
and the whole path -- lm-eval's generate_until through qeval's recorder, a chat template with
an ``enable_thinking`` switch -- on a real tiny model."""

from __future__ import annotations

import math

import pytest

from qeval.eval.reasoning import (
    Generation,
    generation_columns,
    generation_metrics,
    percentile,
    read_generation,
    split_reasoning,
)


def _ids(text: str) -> list[int]:
    """One id per character (the scripted 'tokenizer' of these tests); 0 is the end of turn."""
    return [ord(c) for c in text]


def _decode(ids) -> str:
    return "".join(chr(i) for i in ids if i != 0)


def _read(text: str, stop=(), eos=False, prompt_opens=False) -> Generation:
    ids = _ids(text) + ([0, 0] if eos else [])
    return read_generation(text, list(stop), ids, [0], _decode, prompt_opens)


def test_split_reasoning_states() -> None:
    assert split_reasoning("<think>a\nb</think>\n\nThe answer is 4.") == ("a\nb", "The answer is 4.", "closed")
    assert split_reasoning("<think>still thinking") == ("still thinking", "", "unclosed")
    assert split_reasoning("thinking, opened by the prompt", prompt_opens=True)[2] == "unclosed"
    assert split_reasoning("done</think> 7", prompt_opens=True) == ("done", "7", "closed")
    assert split_reasoning("The answer is 4.") == ("", "The answer is 4.", "none")
    # the last close tag ends the block (a model that writes the tag twice)
    assert split_reasoning("<think>x</think>y</think>z")[1] == "z"


def test_answer_after_the_block_is_cut_at_the_first_stop_sequence() -> None:
    g = _read("<think>Q: is this a stop? no</think>So the answer is yes.\n\nQuestion: next", stop=["\n\n", "Q:"])
    # the reasoning's own "Q:" does not cut the answer (lm-eval with think_end_token does the same)
    assert (g.answer, g.state, g.truncated) == ("So the answer is yes.", "closed", False)
    assert g.reasoning_chars == len("Q: is this a stop? no")


def test_without_a_block_the_answer_is_lm_evals_cut() -> None:
    from lm_eval.models.utils import postprocess_generated_text

    text = "The answer is 6.\n\nQ: more"
    stop = ["Q:", "\n\n"]
    assert _read(text, stop).answer == postprocess_generated_text(text, stop, None)


def test_unclosed_block_has_no_answer_even_if_it_names_one() -> None:
    g = _read("<think>the answer is yes, so the answer is", stop=["\n\n"])
    assert (g.answer, g.state, g.truncated) == ("", "unclosed", True)


def test_length_ends_at_eos_at_the_stop_sequence_or_at_the_budget() -> None:
    assert _read("abc", eos=True).tokens == 4  # three tokens and the end of turn
    assert not _read("abc", eos=True).truncated
    g = _read("abc\n\nleftover generated after the stop", stop=["\n\n"])
    assert (g.tokens, g.truncated, g.answer) == (5, False, "abc")  # 'a','b','c','\n','\n' completes the stop
    g = _read("abcdefgh")
    assert (g.tokens, g.truncated) == (8, True)  # no end of turn, no stop: the budget ran out


def test_loops_are_repeated_four_grams() -> None:
    looping = "We add the two numbers. " * 8
    assert _read(looping).loops
    assert not _read("First we add two and three to get five, then double it for ten.").loops
    assert not _read("").loops


def test_without_token_ids_length_is_words_and_truncation_unknown() -> None:
    g = read_generation("<think>a b</think> c d e", [], None, [0])
    assert (g.tokens, g.truncated, g.state, g.answer) == (5, False, "closed", "c d e")


def test_percentile_is_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == pytest.approx(9.1)
    assert percentile([5], 0.9) == 5 and math.isnan(percentile([], 0.9))


def test_generation_metrics_and_columns() -> None:
    gens = [
        _read("<think>x</think>yes", eos=True),  # 19 tokens + eos, closed
        _read("<think>never closed"),  # truncated, unclosed
        _read("no", eos=True),  # 3 tokens
        _read("loop loop loop loop " * 5),  # truncated, loops
    ]
    m = generation_metrics(gens)
    tokens = [g.tokens for g in gens]
    assert m["response_tokens"] == pytest.approx(sum(tokens) / 4)
    assert m["response_tokens_p90"] == pytest.approx(percentile(tokens, 0.9))
    assert (m["truncated_share"], m["unclosed_think_share"], m["think_share"], m["loop_share"]) == (
        0.5,
        0.25,
        0.5,
        0.25,
    )
    assert m["truncated_share_stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["responses"] == 4
    cols = generation_columns([gens[1], None])
    assert cols == {
        "response_tokens": [gens[1].tokens, None],
        "truncated": [True, None],
        "unclosed_think": [True, None],
        "loops": [False, None],
    }
    assert generation_metrics([]) == {}


# ------------------------------------------------------------------ settings


# A Qwen3-style switch: thinking on opens the block in the prompt (R1-style), off writes an
# empty block (what Qwen3's template does with enable_thinking=false)
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny():
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    return build_tiny_model("llama"), byte_tokenizer()


def test_thinking_needs_a_template_with_the_switch(tiny) -> None:
    from qeval.config import ConfigError, SuiteSpec, TaskEntry
    from qeval.eval.suite import check_chat_settings

    model, tok = tiny
    suite = SuiteSpec("s", {"gen": TaskEntry(task="qeval_strategyqa_cot", apply_chat_template=True, thinking="on")})
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"suite.tasks.gen.thinking='on'.*is missing"):
        check_chat_settings(suite, tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="has no enable_thinking switch"):
        check_chat_settings(suite, tok)
    tok.chat_template = THINKING_TEMPLATE
    check_chat_settings(suite, tok)
    tok.chat_template = None


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"thinking": "maybe"}, "suite.tasks.gen.thinking='maybe'"),
        ({"thinking": "on"}, "unless apply_chat_template is true"),
        ({"max_gen_toks": 0}, "suite.tasks.gen.max_gen_toks=0"),
    ],
)
def test_bad_generation_settings_name_the_key(bad, message, monkeypatch) -> None:
    from hydra import compose, initialize_config_dir

    from qeval.cell import build_cell, validate
    from qeval.cli import CONF_DIR
    from qeval.config import ConfigError

    overrides = ["model=tiny-llama", "suite=tiny", "+tasks.add.gen={task:qeval_strategyqa_cot}"]
    overrides += [f"+tasks.add.gen.{k}={v!r}" if "=" in str(v) else f"+tasks.add.gen.{k}={v}" for k, v in bad.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        validate(build_cell(cfg))


# ------------------------------------------------------------------ the whole path


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_generation_task_reports_response_shape_per_cell_and_item(tiny, thinking: str) -> None:
    """qeval_strategyqa_cot through the chat template on a random tiny model: with thinking on
    the prompt opens a block the model never closes (every answer unclosed, hence empty, hence
    wrong); off, the template closes an empty block itself and the model's text is the answer.
    The budget of 8 tokens runs out on every item (random bytes rarely end a turn)."""
    from qeval.eval.harness import run_lm_eval, score_lm_eval

    model, tok = tiny
    tok.chat_template = THINKING_TEMPLATE
    try:
        metrics, items = score_lm_eval(
            model,
            tok,
            "qeval_strategyqa_cot",
            limit=3,
            num_fewshot=0,
            batch_size=4,
            apply_chat_template=True,
            thinking=thinking,
            max_gen_toks=8,
        )
        out = run_lm_eval(
            model,
            tok,
            "qeval_strategyqa_cot",
            limit=1,
            num_fewshot=0,
            batch_size=4,
            apply_chat_template=True,
            thinking=thinking,
            max_gen_toks=8,
            log_samples=True,
        )
    finally:
        tok.chat_template = None
    prompt = out["samples"]["qeval_strategyqa_cot"][0]["arguments"][0][0]
    assert prompt.endswith("<think>\n") if thinking == "on" else prompt.endswith("</think>\n\n")
    gens = list(out["qeval_generations"].values())
    assert len(gens) == 1
    assert metrics["responses"] == 3 and items["id"] == ["0", "1", "2"]
    assert metrics["unclosed_think_share"] == (1.0 if thinking == "on" else 0.0)
    assert items["unclosed_think"] == [thinking == "on"] * 3
    # every response is within the budget; a truncated one used all of it
    for tokens, truncated in zip(items["response_tokens"], items["truncated"]):
        assert 1 <= tokens <= 8 and (tokens == 8 if truncated else True)
    assert metrics["truncated_share"] == sum(items["truncated"]) / 3
    assert metrics["response_tokens"] == pytest.approx(sum(items["response_tokens"]) / 3)
    if thinking == "on":
        assert all(a == "[invalid]" for a in items["answer"])  # the empty answer extracts nothing
        assert metrics["exact_match[strict-match]"] == 0.0


def test_non_generation_tasks_have_no_response_metrics(tiny) -> None:
    from qeval.eval.harness import score_lm_eval

    metrics, items = score_lm_eval(*tiny, "qeval_boolq", limit=2, batch_size=4)
    assert "response_tokens" not in metrics and "response_tokens" not in items


def test_new_entry_keys_leave_old_cells_identity_alone() -> None:
    """thinking/max_gen_toks at their defaults are not in a cell's identity (finished cells of
    earlier versions keep their hash); set, they are."""
    from qeval.cell import build_cell
    from qeval.cli import compose_config

    base = ["model=tiny-llama", "suite=emergent", "quant=w4g128"]
    entry = build_cell(compose_config(base)).identity()["suite"]["tasks"]["gsm8k"]
    assert "thinking" not in entry and "max_gen_toks" not in entry
    changed = build_cell(compose_config([*base, "suite.tasks.gsm8k.max_gen_toks=64"])).identity()
    assert changed["suite"]["tasks"]["gsm8k"]["max_gen_toks"] == 64


def test_the_entry_budget_replaces_the_one_in_gen_kwargs(tiny) -> None:
    from qeval.eval.harness import run_lm_eval

    out = run_lm_eval(
        *tiny,
        "qeval_strategyqa_cot",
        limit=1,
        num_fewshot=0,
        batch_size=4,
        gen_kwargs="max_gen_toks=3,do_sample=false",
        max_gen_toks=5,
        log_samples=True,
    )
    assert out["samples"]["qeval_strategyqa_cot"][0]["arguments"][0][1]["max_gen_toks"] == 5
    (generation,) = out["qeval_generations"].values()
    assert generation.tokens <= 5
