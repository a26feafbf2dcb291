"""Shared-context log-likelihood scoring (qeval.eval.shared_context): the same (log-likelihood,
is-greedy) answers as lm-eval's own ``HFLM``, in the same order, with each shared context
computed once; and the spec check that decides when it may be used.

Parity on the real model and tasks is ``benchmarks/shared_context_parity.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
from qeval.eval.scorer import HFScorer, shared_context_allowed
from qeval.models.tiny import VOCAB_SIZE, build_tiny_model, byte_tokenizer

TOL = 1e-4
MAX_LENGTH = 512  # the tiny models' max_position_embeddings (and the byte tokenizer's limit)


def _lms(model, batch_size: int = 4, rows_per_batch: int | None = None):
    from lm_eval.models.huggingface import HFLM

    from qeval.eval.shared_context import SharedContextLM

    tok = byte_tokenizer()
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    ours = SharedContextLM(
        pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", rows_per_batch=rows_per_batch
    )
    return ref, ours


def _requests(seed: int = 0, long: bool = True) -> list[tuple]:
    """Hand-made requests: shared contexts with 1-6 continuations of 1-9 tokens, single-token
    choices, a one-token context, duplicates, and (``long``) contexts past the max length."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]

    reqs = []
    for g in range(9):
        ctx = toks(rng.randrange(2, 50))
        for c in range(rng.randrange(1, 7)):
            reqs.append(((f"c{g}", f"x{c}"), ctx, toks(rng.randrange(1, 10))))
    ctx = toks(30)
    reqs += [(("mc", f"{c}"), ctx, [c + 3]) for c in range(4)]  # single-token choices (MMLU-like)
    reqs.append((("one", "t"), toks(1), toks(4)))  # nothing to cache: only the last context token
    reqs.append(reqs[0])  # a duplicate request
    if long:
        ctx = toks(MAX_LENGTH + 90)  # left-truncated, by a different amount per continuation length
        reqs += [(("long", f"{n}"), ctx, toks(n)) for n in (1, 3, 7)]
        reqs.append((None, toks(20), toks(MAX_LENGTH - 40)))  # context truncated by the continuation
    rng.shuffle(reqs)
    return reqs


def _assert_same(ref: list, ours: list, rel: float = 0.0) -> None:
    assert len(ref) == len(ours)
    for i, ((lr, gr), (lo, go)) in enumerate(zip(ref, ours)):
        assert abs(lr - lo) <= TOL + rel * abs(lr), (i, lr, lo)
        assert gr == go, i


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama")


def test_same_answers_as_hflm_in_input_order(llama) -> None:
    reqs = _requests()
    ref, ours = _lms(llama)
    expected = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    # a 472-token continuation sums ~470 log-probabilities near -7: float32 carries ~4e-4 there
    _assert_same(expected, got, rel=2e-7)
    assert ours.shared_stats["fallback"] == 0
    assert ours.shared_stats["requests"] == len(reqs)
    # fewer groups than requests: shared contexts were computed once
    assert ours.shared_stats["groups"] < len({tuple(r[1]) for r in reqs}) + 3 < len(reqs)
    # order: a permuted request list gets the permuted answers
    perm = list(range(len(reqs)))
    random.Random(1).shuffle(perm)
    again = ours._loglikelihood_tokens([reqs[i] for i in perm], disable_tqdm=True)
    _assert_same([got[i] for i in perm], again, rel=2e-7)


def test_small_continuation_batches_split_a_group(llama) -> None:
    """A group with more choices than one continuation forward holds is split over several."""
    reqs = _requests(seed=2, long=False)
    ref, ours = _lms(llama, batch_size=2, rows_per_batch=3)
    _assert_same(
        ref._loglikelihood_tokens(reqs, disable_tqdm=True), ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    )


def test_partial_results_reach_the_cache_hook(llama) -> None:
    class Hook:
        def __init__(self) -> None:
            self.seen: dict = {}

        def add_partial(self, kind: str, key, value) -> None:
            self.seen[(kind, key)] = value

    reqs = _requests(seed=3, long=False)
    ref, ours = _lms(llama)
    ref.cache_hook, ours.cache_hook = Hook(), Hook()
    ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert ref.cache_hook.seen.keys() == ours.cache_hook.seen.keys()
    for key, (lr, gr) in ref.cache_hook.seen.items():
        lo, go = ours.cache_hook.seen[key]
        assert abs(lr - lo) <= TOL and gr == go


@pytest.mark.parametrize("family", ["gemma3", "opt", "qwen2"])
def test_other_families(family: str) -> None:
    """Gemma 3's sliding layers (window 32): groups that fit the window are shared, longer
    ones go to HFLM's own path; OPT's learned positions; Qwen2's biases."""
    reqs = _requests(seed=4)
    ref, ours = _lms(build_tiny_model(family))
    _assert_same(
        ref._loglikelihood_tokens(reqs, disable_tqdm=True),
        ours._loglikelihood_tokens(reqs, disable_tqdm=True),
        rel=2e-7,
    )
    if family == "gemma3":
        assert 0 < ours.shared_stats["fallback"] < len(reqs)
    else:
        assert ours.shared_stats["fallback"] == 0


def _quantized(spec: QuantSpec, dtype: torch.dtype = torch.float32):
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    calib = [torch.randint(3, VOCAB_SIZE, (1, 32), generator=torch.Generator().manual_seed(5))]
    return quantize_model(build_tiny_model("llama", dtype=dtype), spec, get_method("rtn"), lambda: calib)


W8 = WeightSpec(bits=8, granularity="channel", sym=True)
ALLOWED = {
    "w8a8": QuantSpec(name="w8a8", w=W8, a=ActivationSpec(bits=8)),
    "w8a8-static": QuantSpec(name="w8a8-static", w=W8, a=ActivationSpec(bits=8, granularity="tensor", dynamic=False)),
    "w4a8kv4": QuantSpec(name="w4a8kv4", w=W8, a=ActivationSpec(bits=8), kv=KVSpec(bits=4, group_size=8)),
}
REFUSED = {
    "a8-per-tensor-dynamic": QuantSpec(name="t", w=W8, a=ActivationSpec(bits=8, granularity="tensor", dynamic=True)),
    "kv4-channel-keys": QuantSpec(name="kc", kv=KVSpec(bits=4, key_granularity="channel")),
    "kivi4": QuantSpec(name="kivi", kv=KVSpec(bits=4, semantics="cache", group_size=8, residual=8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_quantized_models_score_the_same(name: str, dtype: torch.dtype) -> None:
    """Equal to 1e-4 in float32; in float64, where rounding noise cannot flip a quantization
    code, equal to 1e-9: the two paths compute the same function."""
    spec = ALLOWED[name]
    assert shared_context_allowed(spec) == (True, "")
    reqs = _requests(seed=5, long=False)
    ref, ours = _lms(_quantized(spec, dtype))
    expected = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    _assert_same(expected, got)
    if dtype == torch.float64:
        assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-9


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_specs_would_change_the_scores(name: str) -> None:
    """Why the check exists: under these specs the context's numbers depend on the continuation."""
    spec = REFUSED[name]
    allowed, reason = shared_context_allowed(spec)
    assert not allowed and "depends on" in reason
    reqs = _requests(seed=5, long=False)
    ref, ours = _lms(_quantized(spec))
    expected = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) > 1e-2


@pytest.mark.parametrize(
    "preset, allowed",
    [
        ("fp16", True),
        ("w4g128", True),
        ("w8a8", True),  # dynamic per-token activations
        ("w8a8-static", True),  # a calibrated (fixed) per-tensor scale
        ("w4a8kv4", True),
        ("kv4", True),  # per-token keys and values, quantized as they enter the cache
        ("kv8-fp8", False),  # one scale per layer and forward
        ("kivi4", False),  # KIVI: the residual window
    ],
)
def test_shared_context_allowed_on_presets(preset: str, allowed: bool) -> None:
    from omegaconf import OmegaConf

    from qeval.cell import from_plain
    from qeval.cli import CONF_DIR

    data = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "quant" / f"{preset}.yaml"))
    assert isinstance(data, dict)
    data.pop("defaults")  # the schema: QuantSpec's own defaults
    spec = from_plain(QuantSpec, data, "quant")
    ok, reason = shared_context_allowed(spec)
    assert ok is allowed
    assert (reason == "") is allowed


def _lm_eval_class(lm: object) -> type:
    """The class qeval's mixins were put over: the first class in ``lm``'s MRO, after the
    composed one, that is not from qeval's own mixin modules."""
    from lm_eval.models.huggingface import HFLM

    below = [
        c for c in type(lm).__mro__[1:] if not c.__module__.startswith(("qeval.eval.recording", "qeval.eval.rolling"))
    ]
    assert issubclass(below[0], HFLM)
    return below[0]


def test_scorer_flag_picks_the_lm() -> None:
    from lm_eval.models.huggingface import HFLM

    from qeval.eval.shared_context import SharedContextLM

    model, tok = build_tiny_model("llama"), byte_tokenizer()
    # a bare model (whose spec the scorer cannot know): lm-eval's HFLM unless asked for
    # (each with qeval's mixins -- generations recorded, rolling batches bounded -- over exactly that class)
    assert _lm_eval_class(HFScorer(model, tok).lm_eval_model(4)) is HFLM
    assert _lm_eval_class(HFScorer(model, tok, shared_context=True).lm_eval_model(4)) is SharedContextLM


@pytest.mark.parametrize(
    ("spec", "enabled", "expected"),
    [
        (QuantSpec(w=WeightSpec(bits=4, group_size=32)), True, "shared-context"),
        (QuantSpec(kv=KVSpec(bits=4, semantics="cache")), True, "hflm (KV semantics 'cache'"),
        (QuantSpec(w=WeightSpec(bits=4, group_size=32)), False, "hflm (backend.shared_context=false)"),
    ],
)
def test_hf_backend_scores_with_shared_context_where_the_spec_allows(spec, enabled, expected) -> None:
    """The hf backend asks shared_context_allowed(spec), and the record says which scorer ran."""
    from lm_eval.models.huggingface import HFLM

    from qeval.backends.base import OpenRequest
    from qeval.backends.hf import HFBackend, HFSettings
    from qeval.eval.shared_context import SharedContextLM

    model, tok = build_tiny_model("llama"), byte_tokenizer()
    request = OpenRequest(
        model=model, tokenizer=tok, spec=spec, seed=0, export_root=None, export_name="", calibration=list
    )
    with HFBackend(HFSettings(shared_context=enabled)).open(request) as scorer:
        lm = scorer.lm_eval_model(4)
    assert request.record["lm_eval_scoring"].startswith(expected)
    assert _lm_eval_class(lm) is (SharedContextLM if expected == "shared-context" else HFLM)  # recorded


def test_rolling_windows_use_hflms_own_path(llama) -> None:
    """loglikelihood_rolling (perplexity tasks) shares no context: HFLM's own code scores it."""
    from lm_eval.api.instance import Instance

    text = "".join(random.Random(6).choice("abcdefgh ") for _ in range(1500))  # 3 windows of 512
    inst = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ref, ours = _lms(llama)
    (a,), (b,) = ref.loglikelihood_rolling(inst, disable_tqdm=True), ours.loglikelihood_rolling(inst, disable_tqdm=True)
    assert a == b
    assert ours.shared_stats["requests"] == 0


def test_cell_identity_says_when_shared_context_scoring_ran() -> None:
    """Cells scored with shared contexts are other cells (float32 noise can move a quantized
    model's numbers); cells that keep HFLM keep the identity they always had."""
    from qeval.backends.hf import HFBackend, HFSettings

    on, off = HFBackend(HFSettings()), HFBackend(HFSettings(shared_context=False))
    w4, kivi = QuantSpec(w=WeightSpec(bits=4, group_size=32)), QuantSpec(kv=KVSpec(bits=4, semantics="cache"))
    assert on.cell_identity(w4) == {"name": "hf", "device": "cpu", "scoring": "shared-context"}
    assert on.cell_identity(kivi) == off.cell_identity(w4) == on.identity() == {"name": "hf", "device": "cpu"}
