"""Degeneration and agreement metrics for generated dialogue answers.

Qllm-Eval (Liu et al., 2024) found that quantization damages dialogue in two
recognisable ways: *sentence-level repetition* (the same sentence again and
again; at W3 and KV3) and *token-level repetition and non-words* (loops of a
word or symbol, strings that are not words; at W2, W4A4 and KV2).  Judge
scores need an LLM judge; these metrics need nothing but the text, so every
user can see the degeneration offline.  Each function scores one answer and
documents the exact definition used; :func:`aggregate` averages them
(:func:`qeval.eval.scores.mean_stderr`).

Tokens.  Repetition and diversity are measured on *word tokens*
(:func:`word_tokens`): lower-cased runs of letters/digits (with inner
apostrophes), plus every other non-space character as a token of its own, so
a loop of ``!!!!`` or ``....`` (a typical output of a broken model) is a loop
of tokens too.  Word tokens are independent of the model's tokenizer, so
numbers compare across models.

Undefined values.  A metric that is undefined for an answer (no sentence, no
n-gram, no word) is ``nan`` and :func:`~qeval.eval.scores.mean_stderr` leaves it out, so an empty
answer neither counts as repetitive nor as diverse; the task reports the
share of empty answers separately.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from qeval.eval.scores import NAN, mean_stderr

_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\s]", re.UNICODE)
_LIST_MARKER_RE = re.compile(r"^\s*(?:[-*+•>#]+|\(?\d{1,3}[.)]|\(?[a-zA-Z][.)])\s+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_FENCE_RE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE_RE = re.compile(r"`[^`\n]*`")
_URL_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)|^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.IGNORECASE)


# --------------------------------------------------------------------------- tokens and sentences


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens: letter/digit runs (``don't`` is one token) and single symbols.

    ``"Hello, world!!"`` -> ``["hello", ",", "world", "!", "!"]``.  Underscores
    count as symbols.
    """
    return _WORD_RE.findall(text.lower())


def sentences(text: str) -> list[str]:
    """Normalised sentences of an answer, in order.

    Lines are split first (list items and headings are sentences of their own),
    a leading list marker (``-``, ``*``, ``1.``, ``a)``, ``#``) is dropped, and
    each line is split after ``.``, ``!`` or ``?`` followed by whitespace.  A
    sentence is normalised by lower-casing, collapsing whitespace and stripping
    leading/trailing characters that are neither letters nor digits (markdown
    ``**``, quotes, the final full stop).  Pieces without a letter are dropped
    (they are numbers or punctuation, not sentences).
    """
    out = []
    for line in text.splitlines():
        line = _LIST_MARKER_RE.sub("", line)
        for piece in _SENTENCE_END_RE.split(line):
            norm = " ".join(piece.lower().split())
            norm = _strip_non_alnum(norm)
            if any(ch.isalpha() for ch in norm):
                out.append(norm)
    return out


def _strip_non_alnum(s: str) -> str:
    start, end = 0, len(s)
    while start < end and not s[start].isalnum():
        start += 1
    while end > start and not s[end - 1].isalnum():
        end -= 1
    return s[start:end]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# --------------------------------------------------------------------------- repetition and diversity


def sentence_repetition(text: str) -> float:
    """Share of an answer's sentences that repeat an earlier sentence of the same answer.

    Sentences come from :func:`sentences` (so whitespace and case are
    normalised).  ``"I like cats. I like cats. I like cats."`` -> 2/3: the
    first occurrence is new, the other two repeat it.  ``nan`` when the answer
    has no sentence.  This is Qllm-Eval's W3/KV3 failure: the model says the
    same thing again instead of going on.
    """
    sents = sentences(text)
    if not sents:
        return NAN
    seen: set[str] = set()
    repeats = 0
    for s in sents:
        if s in seen:
            repeats += 1
        seen.add(s)
    return repeats / len(sents)


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """rep-n: ``1 - unique n-grams / total n-grams`` over the answer's word tokens.

    0 when no n-gram occurs twice (a fully distinct text), approaching 1 for a
    loop (``"a b a b a b"`` with n=2: 5 bigrams, 2 distinct -> 0.6).  It grows
    with both failure modes Qllm-Eval describes: a repeated sentence repeats
    all its n-grams, and a token loop repeats one n-gram many times.  ``nan``
    when the answer has fewer than ``n`` tokens.  (Welleck et al., 2019, use
    the same ratio on model tokens; word tokens keep it comparable across
    tokenizers.)
    """
    grams = ngrams(word_tokens(text), n)
    if not grams:
        return NAN
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(text: str, n: int) -> float:
    """distinct-n: distinct n-grams / total n-grams of one answer's word tokens (``nan`` if none).

    Li et al. (2016) define it on a corpus of responses; here it is per answer
    and then averaged, like the other metrics, so every answer weighs the same.
    Per answer it equals ``1 - rep-n``; distinct-1 and distinct-2 are reported
    because they are the usual diversity numbers in the dialogue literature.
    """
    grams = ngrams(word_tokens(text), n)
    if not grams:
        return NAN
    return len(set(grams)) / len(grams)


# --------------------------------------------------------------------------- non-words

_JOINERS = set("'’-./,&°–")
_CODE_OR_MATHS = set("^()[]{}_\\*#`")  # with every Unicode maths symbol (category Sm: + = < > | ~ √ ±)
_MATHS_CHARS_RE = re.compile(r"^[\d.,:;!?'’()\[\]{}^*/+\-−=<>≤≥≠≈±×÷√∑∏∫∞%|²³a-zA-Zα-ωΑ-Ω]+$")
_MATHS_FUNCS = {"sin", "cos", "tan", "log", "ln", "exp", "sqrt", "max", "min", "lim", "mod", "gcd", "lcm", "abs", "det"}
_MARKUP_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:[\s>/]|$)|\w=[\"']")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\([^()]*\)|\[[^\[\]]*\])*$")


def _has_operator(tok: str) -> bool:
    return any(ch in _CODE_OR_MATHS or unicodedata.category(ch) == "Sm" for ch in tok)


def _code_or_maths(raw: str) -> bool:
    """Whether a whitespace token is maths, markup or a code identifier written in prose.

    Maths: only digits, single letters (or two: ``πr``, ``ab``) and
    functions such as ``sqrt``, with an operator (``x^2``, ``f(x)=2x+3``,
    ``(√(a^2``).  Markup: an HTML tag or attribute (``<h1>Title``,
    ``class="x">``).  Code: a dotted identifier with optional call or index
    (``my_var``, ``os.path.join()``, ``arr[i]``).  MT-Bench's maths and coding
    answers are full of these outside code fences; gibberish rarely has their
    shape.
    """
    core = raw.strip("\"'“”‘’").rstrip(".,;:!?")
    if not _has_operator(core):
        return False
    if _MARKUP_RE.search(core) or _IDENT_RE.match(core):
        return True
    if not _MATHS_CHARS_RE.match(core):
        return False
    runs = re.findall(r"[^\W\d_]+", core)
    return all(len(r) <= 2 or r.lower() in _MATHS_FUNCS for r in runs)


_VOWELS = set("aeiouy")


_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK"}
_SCRIPTS_IGNORED = {"GREEK", "MODIFIER", "COMBINING"}  # maths notation, IPA length/stress marks


def _script(ch: str) -> str:
    """The script of a letter, from its Unicode name (``LATIN SMALL LETTER A`` -> ``LATIN``)."""
    try:
        first = unicodedata.name(ch).split()[0]
    except ValueError:
        return "UNKNOWN"
    return _SCRIPT_GROUPS.get(first, first)


def _fold(s: str) -> str:
    """``s`` without diacritics (``shèng`` -> ``sheng``)."""
    return "".join(ch for ch in unicodedata.normalize("NFD", s) if not unicodedata.combining(ch))


def is_nonword(token: str) -> bool:
    """Whether a whitespace-delimited token is implausible as a word (a heuristic, no dictionary).

    The token is first stripped of leading/trailing characters that are neither
    letters nor digits (punctuation, quotes, markdown).  Tokens without a letter
    (numbers, symbols), URLs/e-mail addresses and maths, markup or code
    identifiers written in prose (``x^2``, ``f(x)=2x+3``, ``<h1>Title``,
    ``my_var``; see :func:`_code_or_maths`) are never non-words.  A token is
    a non-word when any of these holds:

    1. it contains a character other than a letter, a digit, a combining mark
       or one of the joiners ``' ’ - . , / & ° –`` (``fo$o``, ``wor:d``,
       ``ab"cd``, ``soft�place``);
    2. letters and digits alternate three times or more (``a1b2``; ``H2O``,
       ``COVID-19``, ``4th``, ``MP3s`` are fine);
    3. a letter occurs four or more times in a row (``aaaa``, ``soooo``);
    4. a unit of 2-6 letters occurs three or more times in a row
       (``thethethe``, ``ababab``);
    5. a run of letters is longer than 20 (longer than almost every English
       word: ``internationalization`` has 20; glued words such as
       ``understandingthatthisis`` are not);
    6. a lower-case Latin run of five or more letters has no vowel (``a e i o u
       y``, diacritics ignored: ``bcdfgk``; upper-case acronyms such as
       ``HTTPS`` are fine);
    7. its letters come from two or more Unicode scripts, Greek and modifier
       letters aside (``wordпри``, ``Пoдвoдник`` with Latin ``o``; ``πr²``,
       ``Δx`` and IPA are fine; Chinese/Japanese/Korean count as one script);
    8. it switches from lower to upper case three or more times (``tHeCaTs``;
       ``iPhone``, ``JavaScript``, ``McDonald`` are fine);
    9. it is a lone letter other than ``a``, ``A`` and ``I`` (``C.``, ``H``).

    Rules 2-9 are the shapes of Qllm-Eval's "meaningless symbols / non-words"
    at W2/W4A4/KV2: sub-word pieces glued together, stuttered letters, script
    mixing, streams of stray letters (``C C. H. HH S.``: SmolLM2-135M at W4A4
    RTN writes 25% lone letters, at FP 1%).  Legitimate text trips them too:
    ``hahaha``, initials and variables such as ``x`` (rule 9: about 1% of the
    words of Wikipedia text and of SmolLM2's FP answers).  What matters is the
    change against the unquantized model on the same prompts.
    """
    tok = _strip_non_alnum(token)
    if not any(ch.isalpha() for ch in tok) or _URL_RE.search(tok) or _code_or_maths(token):
        return False
    if len(tok) == 1:
        return tok not in ("a", "A", "I")
    if any(not (ch.isalnum() or ch in _JOINERS or unicodedata.category(ch).startswith("M")) for ch in tok):
        return True
    kinds = [("L" if ch.isalpha() else "D") for ch in tok if ch.isalnum()]
    if sum(a != b for a, b in zip(kinds, kinds[1:])) >= 3:
        return True
    lower = tok.lower()
    if re.search(r"([^\W\d_])\1{3,}", lower):
        return True
    if re.search(r"([^\W\d_]{2,6}?)\1{2,}", lower):
        return True
    runs = re.findall(r"[^\W\d_]+", tok)
    if any(len(r) > 20 for r in runs):
        return True
    if any(
        len(r) >= 5 and r.islower() and r.isascii() and not (set(r) & _VOWELS) for r in (_fold(run) for run in runs)
    ):
        return True
    scripts = {_script(ch) for ch in tok if ch.isalpha()} - _SCRIPTS_IGNORED
    if len(scripts) >= 2:
        return True
    if sum(a.islower() and b.isupper() for a, b in zip(tok, tok[1:])) >= 3:
        return True
    return False


def strip_code(text: str) -> str:
    """The answer without fenced (```...```, also unclosed) and inline (`...`) code.

    Code is full of identifiers that are not words (``my_var``, ``x[i]``), so
    the non-word share is measured on prose only.
    """
    return _INLINE_CODE_RE.sub(" ", _FENCE_RE.sub(" ", text))


def prose_words(text: str) -> list[str]:
    """Whitespace-delimited tokens of the prose (code removed) that contain a letter."""
    return [t for t in strip_code(text).split() if any(ch.isalpha() for ch in t)]


def nonword_rate(text: str) -> float:
    """Share of the prose words (:func:`prose_words`) that :func:`is_nonword` flags; ``nan`` if none."""
    words = prose_words(text)
    if not words:
        return NAN
    return sum(is_nonword(w) for w in words) / len(words)


# --------------------------------------------------------------------------- combined degeneration


def degeneration(text: str, n: int = 4) -> float:
    """Share of an answer's word tokens that are repeats or non-words (1.0 for an empty answer).

    A word token (:func:`word_tokens`) is *degenerate* when it lies inside a
    repeated n-gram occurrence (an n-gram that already occurred earlier in the
    answer; the earlier occurrence itself is not counted) or inside a
    whitespace-delimited prose token that :func:`is_nonword` flags (code spans
    are exempt from the non-word test, as in :func:`nonword_rate`).
    ``"one two three four one two three four"`` -> 4/8 (the second copy); a
    sentence said three times -> 2/3, like :func:`sentence_repetition`;
    ``"zzzzz is"`` -> 1/2.

    Why a combined rate: quantization breaks dialogue either into loops
    (rep-n sees them) or into high-entropy strings of non-words, where rep-n
    is 0, i.e. *lower* than a healthy model's (SmolLM2-135M on 24 MT-Bench
    questions: rep-4 0.01 at W2g64 RTN against 0.22 at FP).  Counting both on one token
    scale makes every failure mode raise the number.  An answer with no token
    at all is a failed answer and counts as fully degenerate.
    """
    code = [m.span() for m in _FENCE_RE.finditer(text)] + [m.span() for m in _INLINE_CODE_RE.finditer(text)]
    tokens: list[str] = []
    bad: list[bool] = []
    for m in re.finditer(r"\S+", text):
        in_code = any(a < m.end() and m.start() < b for a, b in code)
        flag = not in_code and is_nonword(m.group())
        piece = word_tokens(m.group())  # tokens never cross whitespace: per-chunk = whole-text tokens
        tokens += piece
        bad += [flag] * len(piece)
    if not tokens:
        return 1.0
    seen: set[tuple[str, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            bad[i : i + n] = [True] * n
        seen.add(gram)
    return sum(bad) / len(tokens)


# --------------------------------------------------------------------------- agreement with FP

_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (the ``rouge_score`` package, no stemming).

    Used for agreement with the unquantized model's answer to the same turn:
    1 when the quantized model says the same thing, falling as its answer
    drifts.  ``rouge_score`` lower-cases and keeps ASCII letters and digits
    only.  Two answers that both have no such token agree fully (1.0); one
    empty answer against a non-empty one scores 0.
    """
    global _ROUGE
    if _ROUGE is None:  # rouge_score (and the nltk it loads) only when an FP answer is compared
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = _ROUGE._tokenizer.tokenize
    if not tokenize(prediction) and not tokenize(reference):
        return 1.0
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


# --------------------------------------------------------------------------- aggregation


def answer_metrics(answer: str, reference: str | None = None) -> dict[str, float]:
    """Every per-answer metric of one answer (``rougeL_fp`` only when a reference answer is given)."""
    out = {
        "degeneration": degeneration(answer, 4),
        "rep4": repeated_ngram_ratio(answer, 4),
        "sentence_rep": sentence_repetition(answer),
        "distinct1": distinct_n(answer, 1),
        "distinct2": distinct_n(answer, 2),
        "nonword": nonword_rate(answer),
        "length": float(len(word_tokens(answer))),
        "empty": float(not any(ch.isalnum() for ch in answer)),
    }
    if reference is not None:
        out["rougeL_fp"] = rouge_l(answer, reference)
    return out


def aggregate(per_answer: Sequence[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``{prefix+metric: mean, prefix+metric_stderr: stderr}`` over answers, per metric."""
    out: dict[str, float] = {}
    keys: list[str] = []
    for row in per_answer:
        keys += [k for k in row if k not in keys]
    for key in keys:
        mean, err, _ = mean_stderr(row.get(key, NAN) for row in per_answer)
        out[prefix + key] = mean
        out[prefix + key + "_stderr"] = err
    return out
