"""Reports from a small hand-made result store: normalization, family averages, significance
marks, per-tensor-type and per-method views, and two sweeps compared in one report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from qeval.results import SCHEMA_VERSION, ResultStore

TASKS = {
    "wikitext2": {
        "task": "wikitext2",
        "kind": "perplexity",
        "family": "basic_nlp",
        "primary_metric": "ppl",
        "higher_is_better": False,
    },
    "arc": {
        "task": "qeval_arc_easy",
        "kind": "lm_eval",
        "family": "basic_nlp",
        "primary_metric": "acc",
        "higher_is_better": True,
    },
    "ifeval": {
        "task": "ifeval",
        "kind": "lm_eval",
        "family": "emergent",
        "primary_metric": "strict",
        "higher_is_better": True,
    },
    "needle": {
        "task": "qeval_needle",
        "kind": "native",
        "family": "long_context",
        "primary_metric": "acc",
        "higher_is_better": True,
    },
    "mt_bench": {
        "task": "qeval_mt_bench",
        "kind": "native",
        "family": "dialogue",
        "primary_metric": "degeneration",
        "higher_is_better": False,
    },
}
SPECS = {
    "fp16": ("FP", "FP16"),
    "w4g128": ("W", "W4g128"),
    "w3g128": ("W", "W3g128"),
    "kv4": ("KV", "KV4"),
    "w8a8": ("WA", "W8A8"),
}


N_ARC, N_STRICT, N_NEEDLE, N_MT, N_WINDOWS, WINDOW_TOKENS = 500, 100, 30, 48, 8, 2047
FP_PPL = 10.0  # the fixture's unquantized perplexity


def _binary(n: int, share: float) -> list[float]:
    """n outcomes, the first round(share * n) right: the cells' right items nest, so the flips
    between two cells are exactly the difference in counts (all right -> wrong)."""
    k = round(share * n)
    return [1.0] * k + [0.0] * (n - k)


def _items(ppl: float, fp_ppl: float, acc: float, strict: float) -> dict:
    """Per-item tables consistent with the aggregate metrics; perplexity windows carry the
    token-level sums of the NLL difference against FP (per-token spread 1 nat)."""
    import math

    d = math.log(ppl) - math.log(fp_ppl)
    ids = lambda n: [str(i) for i in range(n)]  # noqa: E731
    return {
        "wikitext2": {
            "id": [f"w{i}" for i in range(N_WINDOWS)],
            "nll": [math.log(ppl)] * N_WINDOWS,
            "tokens": [WINDOW_TOKENS] * N_WINDOWS,
            "dnll_sum": [WINDOW_TOKENS * d] * N_WINDOWS,
            "dnll_sq_sum": [WINDOW_TOKENS * (d * d + (1.0 if d else 0.0))] * N_WINDOWS,
        },
        "arc": {"id": ids(N_ARC), "acc": _binary(N_ARC, acc)},
        "ifeval": {"id": ids(N_STRICT), "strict": _binary(N_STRICT, strict)},
        "needle": {"id": ids(N_NEEDLE), "acc": _binary(N_NEEDLE, strict)},
        "mt_bench": {"id": ids(N_MT), "degeneration": _binary(N_MT, 1.1 - strict)},
    }


def write_cell(store: ResultStore, quant: str, method: str, ppl: float, acc: float, strict: float) -> None:
    tensor_type, bits = SPECS[quant]
    store.write(
        {
            "schema_version": SCHEMA_VERSION,
            "hash": f"{quant}-{method}",
            "label": f"m__{quant}__{method}",
            "sweep": store.dir.name,
            "status": "ok",
            "tasks": TASKS,
            "cell": {
                "model": "m",
                "quant": quant,
                "method": method,
                "suite": "s",
                "backend": "hf",
                "tensor_type": tensor_type,
                "bits": bits,
            },
            "metrics": {
                "wikitext2": {
                    "ppl": ppl,
                    "ppl_stderr": 0.1,
                    "windows": N_WINDOWS,
                    # divergence from FP grows with the perplexity gap (none for FP itself)
                    **(
                        {}
                        if quant == "fp16"
                        else {
                            "kld": ppl / FP_PPL - 0.99,
                            "kld_stderr": 0.001,
                            "top1_agree": FP_PPL / ppl,
                            "top1_agree_stderr": 0.004,
                        }
                    ),
                },
                "arc": {"acc": acc, "acc_stderr": 0.02, "samples": N_ARC},
                # a generation task: its answers get longer and loop more as quality falls
                "ifeval": {
                    "strict": strict,
                    "strict_stderr": 0.05,
                    "samples": N_STRICT,
                    "responses": N_STRICT,
                    "response_tokens": 100.0 / strict,
                    "response_tokens_p90": 150.0 / strict,
                    "truncated_share": 0.5 - strict / 2,
                    "unclosed_think_share": 0.0,
                    "think_share": 0.0,
                    "loop_share": 0.5 - strict / 2,
                },
                # long context falls with the KV bits, dialogue degenerates with fewer weight bits
                "needle": {
                    "acc": strict,
                    "acc@1000tok": strict + 0.1,
                    "acc@4000tok": strict - 0.1,
                    "acc@1000tok_stderr": 0.1,
                    "samples": N_NEEDLE,
                },
                "mt_bench": {"degeneration": 1.1 - strict, "rep4": 0.9 - strict, "samples": N_MT},
            },
        },
        _items(ppl, FP_PPL, acc, strict),
    )


@pytest.fixture()
def stores(tmp_path):
    rtn = ResultStore(tmp_path, "rtn")
    write_cell(rtn, "fp16", "rtn", 10.0, 0.60, 0.50)
    write_cell(rtn, "w4g128", "rtn", 12.0, 0.58, 0.45)  # arc: 0.02 < 2 x 0.028 -> noise
    write_cell(rtn, "w3g128", "rtn", 15.0, 0.40, 0.20)  # arc: 0.20 -> significant
    write_cell(rtn, "kv4", "rtn", 10.1, 0.60, 0.50)
    write_cell(rtn, "w8a8", "rtn", 10.5, 0.59, 0.48)
    for quant, e2e in (("fp16", 2.0), ("w8a8", 1.2)):  # timings from benchmarks/efficiency.py
        rtn.write(
            {
                "schema_version": SCHEMA_VERSION,
                "kind": "efficiency",
                "status": "ok",
                "hash": f"eff-{quant}",
                "label": f"efficiency__m__{quant}__rtn",
                "model": "m",
                "quant": quant,
                "method": "rtn",
                "scheme": "dense",
                "device": "cpu",
                "engine": {"dtype": "float32"},
                "weight_bytes": 2**20,
                "kv_bytes_per_token": 1024,
                "timings": [
                    {
                        "batch": 1,
                        "input_len": 128,
                        "output_len": 32,
                        "prefill_s": 0.1,
                        "decode_s_per_token": 0.02,
                        "e2e_s": e2e,
                        "throughput_tok_s": 16.5,
                    }
                ],
            }
        )
    gptq = ResultStore(tmp_path, "gptq")
    write_cell(gptq, "w4g128", "gptq", 11.0, 0.59, 0.47)
    write_cell(gptq, "w3g128", "gptq", 12.5, 0.55, 0.40)
    return rtn.dir, gptq.dir


def test_generation_tasks_show_length_beside_the_score(stores, tmp_path):
    from qeval.report.write import write_tables

    markdown, files = write_tables(list(stores), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "responses.csv")
    assert set(table["task"]) == {"ifeval"}  # only the generation task
    row = table[(table.quant == "w3g128") & (table.method == "rtn")].iloc[0]
    assert (row["primary"], row["score"], row["n"]) == ("strict", 0.20, N_STRICT)
    assert row["response_tokens"] == pytest.approx(500.0) and row["truncated_share"] == pytest.approx(0.4)
    assert list(table.columns[-6:]) == [
        "response_tokens",
        "response_tokens_p90",
        "truncated_share",
        "unclosed_think_share",
        "think_share",
        "loop_share",
    ]
    assert "score beside the answers' shape" in markdown
    assert "Generation: score beside length" in (tmp_path / "out" / "report.html").read_text()


def test_verdicts_come_from_paired_items(stores):
    """Each quantized cell against FP item by item: flips and McNemar on right/wrong items, a
    token-level z-test on perplexity, and the three-way verdict at keep=98%."""
    from qeval.report.frames import add_normalized, long_frame, read_sweeps
    from qeval.report.verdicts import mark_significant, paired_frame
    from qeval.stats.paired import mcnemar_exact

    records = read_sweeps([stores[0]])
    paired = paired_frame(records, keep=0.98).set_index(["quant", "task"])
    assert len(paired) == 4 * len(TASKS)  # every quantized cell x task, the FP cell is the reference
    w4 = paired.loc[("w4g128", "arc")]
    assert (w4.right_to_wrong, w4.wrong_to_right, w4.n) == (10, 0, N_ARC)  # 300 -> 290 right
    assert w4.p_diff == pytest.approx(mcnemar_exact(10, 0)) == pytest.approx(2 / 1024)
    assert w4.changed == pytest.approx(10 / N_ARC)
    # 10 flips in 500: a real difference, but 96.7% retained is not shown to be below 98%
    assert w4.verdict == "inconclusive" and w4.low < 0.98 < w4.high
    assert paired.loc[("w3g128", "arc"), "verdict"] == "loss"  # 100 right -> wrong
    wt = paired.loc[("w3g128", "wikitext2")]
    assert wt.verdict == "loss" and wt.retained == pytest.approx(10 / 15) and wt.test == "z (tokens)"
    assert wt.n == N_WINDOWS * WINDOW_TOKENS
    # no flips in 500 items: confidently within; in 30 needle cases: too few to say
    assert paired.loc[("kv4", "arc"), "verdict"] == "within"
    needle = paired.loc[("kv4", "needle")]
    assert needle.verdict == "inconclusive" and needle.n_needed > N_NEEDLE
    # a lower-is-better rate (degeneration) is compared as its complement
    assert paired.loc[("w3g128", "mt_bench"), "note"] == "compared as 1 - degeneration"
    # adjusted p-values are never below the raw ones (Benjamini-Hochberg over the report)
    assert (paired.p_diff_adj >= paired.p_diff - 1e-15).all()
    long = mark_significant(add_normalized(long_frame(records)), paired_frame(records)).set_index(["quant", "metric"])
    assert bool(long.loc[("w3g128", "arc.acc"), "significant"]) is True
    assert bool(long.loc[("kv4", "arc.acc"), "significant"]) is False  # identical items
    assert pd.isna(long.loc[("fp16", "arc.acc"), "significant"])  # the reference itself
    assert long.loc[("w3g128", "arc.acc"), "normalized"] == pytest.approx(0.40 / 0.60)


def test_old_records_without_items_get_no_verdicts(tmp_path):
    from qeval.report.verdicts import paired_frame

    store = ResultStore(tmp_path, "old")
    for quant in ("fp16", "w4g128"):
        write_cell(store, quant, "rtn", 10.0, 0.6, 0.5)
    for path in store.dir.glob("*.items.json.gz"):
        path.unlink()
    for path in store.dir.glob("*.json"):  # as qeval 0.2 wrote them: no "items" entry
        rec = json.loads(path.read_text())
        rec.pop("items")
        path.write_text(json.dumps(rec))
    paired = paired_frame(read_sweeps_of(store))
    assert set(paired.verdict) == {"inconclusive"} and set(paired.test) == {"no per-item outcomes"}


def read_sweeps_of(store: ResultStore) -> list:
    from qeval.report.frames import read_sweeps

    return read_sweeps([store.dir])


def test_two_sweeps_compare_methods_side_by_side(stores, tmp_path):
    from qeval.report.write import write_tables

    markdown, files = write_tables(list(stores), tmp_path / "out")
    names = {f.relative_to(tmp_path / "out").as_posix() for f in files}
    assert {
        "primary.csv",
        "primary.tex",
        "families.tex",
        "primary_marked.md",
        "by_method/gptq.csv",
        "by_method/rtn.csv",
        "by_tensor_type/W.csv",
        "by_tensor_type/KV.md",
        "by_tensor_type/WA.tex",
    } <= names
    primary = pd.read_csv(tmp_path / "out" / "primary.csv")
    w3 = primary[primary.bits == "W3g128"].set_index("method")
    assert w3.loc["gptq", "wikitext2.ppl /FP"] == pytest.approx(1.25)  # GPTQ normalized to RTN's FP cell
    assert w3.loc["rtn", "wikitext2.ppl /FP"] == pytest.approx(1.5)
    # family average, the Qllm-Eval way: mean over the family's tasks of the oriented ratio
    families = pd.read_csv(tmp_path / "out" / "families.csv").set_index(["quant", "method"])
    assert families.loc[("w3g128", "rtn"), "basic_nlp"] == pytest.approx((10 / 15 + 0.40 / 0.60) / 2)
    assert families.loc[("w3g128", "gptq"), "emergent"] == pytest.approx(0.40 / 0.50)
    # views: each keeps the FP reference rows
    gptq_view = pd.read_csv(tmp_path / "out" / "by_method" / "gptq.csv")
    assert sorted(gptq_view["quant"]) == ["fp16", "w3g128", "w4g128"]
    kv_view = pd.read_csv(tmp_path / "out" / "by_tensor_type" / "KV.csv")
    assert sorted(kv_view["quant"]) == ["fp16", "kv4"]
    assert (tmp_path / "out" / "primary.tex").read_text().lstrip().startswith("\\begin{tabular}")
    marked = pd.read_csv(tmp_path / "out" / "primary_marked.csv").set_index(["quant", "method"])
    assert marked.loc[("w3g128", "rtn"), "arc.acc"] == "0.4 ± 0.02 *"
    # ten right -> wrong and none back in 500 items: the paired test sees what two unpaired
    # standard errors (0.58 +- 0.02 against 0.60 +- 0.02) cannot
    assert marked.loc[("w4g128", "rtn"), "arc.acc"] == "0.58 ± 0.02 *"
    assert marked.loc[("kv4", "rtn"), "arc.acc"] == "0.6 ± 0.02"
    assert "with standard errors (* = the paired test finds a difference, adjusted p < 0.05)" in markdown


def test_report_refuses_a_missing_or_empty_folder(stores, tmp_path):
    from qeval.report.write import write_tables

    with pytest.raises(ValueError, match="does not exist"):
        write_tables([stores[0], tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cell records under .*empty"):
        write_tables([tmp_path / "empty"], tmp_path / "out")


def test_every_plot_type_is_drawn(stores, tmp_path):
    from qeval.report.write import write_tables

    _, files = write_tables(list(stores), tmp_path / "out")
    figures = {f.name for f in files if f.suffix == ".png"}
    assert {
        "score_vs_bits_W.png",
        "score_vs_bits_WA.png",
        "score_vs_bits_KV.png",
        "methods_by_bits.png",
        "heatmap.png",
        "abilities_radar_m.png",
        "long_context_needle.png",
        "dialogue_vs_bits.png",
        "divergence_m_wikitext2.png",
        "families_radar_m.png",
        "quality_vs_memory.png",
        "quality_vs_latency.png",
    } == figures
    for png in (f for f in files if f.suffix == ".png"):
        assert png.stat().st_size > 5000 and png.with_suffix(".svg").is_file()


def test_pareto_front_and_memory_axis():
    from qeval.report.frames import bit_width, weight_bits_per_param
    from qeval.report.plots import pareto_front

    assert weight_bits_per_param("W4g128") == pytest.approx(4.125)
    assert weight_bits_per_param("W8A8") == 8 and weight_bits_per_param("KV4") == 16
    assert bit_width("KV", "KV4") == 4 and bit_width("WA", "W4A8") == 4 and bit_width("FP", "FP16") == 16
    points = pd.DataFrame({"bits": [16, 8, 4.125, 3.125, 6], "score": [1.0, 0.99, 0.95, 0.80, 0.90]})
    front = pareto_front(points, "bits", "score")
    assert list(front.bits) == [3.125, 4.125, 8, 16]  # 6 bits at 0.90: 4.125 bits keep more (0.95)


@pytest.mark.parametrize(
    "keep,expected",
    [(0.90, "w8a8 (W8A8, rtn)"), (0.95, "kv4 (KV4, rtn)"), (0.98, "unquantized")],
)
def test_recommendation_is_the_least_memory_confidently_within(stores, keep, expected):
    """basic_nlp: kv4 (ppl 10.1, arc unchanged) is within at 95% but its perplexity interval
    reaches below 98%; w8a8 (ppl 10.5, 5 arc flips) is within at 90% only and needs less
    memory (8-bit weights); nothing is shown within 98%."""
    from qeval.report.frames import read_sweeps
    from qeval.report.recommend import recommendations
    from qeval.report.verdicts import family_verdicts, paired_frame

    paired = paired_frame(read_sweeps(list(stores)), keep=keep)
    advice = recommendations(family_verdicts(paired), paired, keep).set_index("family")
    assert advice.loc["basic_nlp", "recommended"] == expected
    if expected == "unquantized":
        assert "no configuration is confidently within 98%" in advice.loc["basic_nlp", "evidence"]
        assert "items per task needed to decide" in advice.loc["basic_nlp", "evidence"]
    else:
        assert "wikitext2: retained" in advice.loc["basic_nlp", "evidence"]


def test_summary_states_only_tested_findings(stores, tmp_path, run_report):
    proc = run_report([str(stores[0]), str(stores[1]), "--out", str(tmp_path / "out"), "report.keep=0.95"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    # kv4 is within 95% on basic NLP and emergent, but 30 needle cases cannot show it for long context
    # the fixture's suite has no ethics task: the claims name the families measured, and say so
    assert (
        "KV: no tested setting (4 bits) is confidently within 95% in basic_nlp, emergent, dialogue, long_context"
        in summary
    )
    assert "Not measured here: ethics (no task of theirs in this sweep's suite; suite=ethics or" in summary
    assert "Loss: w3g128 (rtn) in basic_nlp: " in summary and "McNemar exact p_adj=" in summary
    assert "flips 100 right->wrong / 0 wrong->right" in summary
    assert "Inconclusive (neither within tolerance nor a significant loss" in summary and "needle for" in summary
    assert "Benjamini-Hochberg" in summary
    assert "Loss: w8a8" not in summary  # its perplexity interval reaches 95%: inconclusive, not a loss
    assert "recommended (least memory confidently within 95%" in proc.stdout
    # another tolerance and correction re-judge the same sweep without rerunning it
    proc = run_report([str(stores[0]), "--out", str(tmp_path / "holm"), "--correction", "holm"], tmp_path)
    assert proc.returncode == 0 and "(holm)" in (tmp_path / "holm" / "summary.md").read_text()


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_html_renders_every_figure_in_headless_chromium(stores, tmp_path):
    """The page is self-contained and every figure decodes in a real browser: a probe script
    appended to a copy of the page counts the images that loaded, and Chromium's DOM dump
    after load reports it."""
    import re
    import subprocess

    from qeval.report.write import write_tables

    _, files = write_tables(list(stores), tmp_path / "out")
    page = tmp_path / "out" / "report.html"
    text = page.read_text()
    n_figures = sum(1 for f in files if f.suffix == ".png")
    assert text.count("<img ") == n_figures and 'src="data:image/png;base64,' in text
    assert 'href="http' not in text and 'src="http' not in text  # nothing fetched from elsewhere
    assert "Efficiency (real kernels)</h2>" in text
    assert text.count("0.4 ± 0.02 *") == 2  # RTN W3's significant loss: in the overview and its tensor-type section
    for heading in (
        "Overview",
        "Tensor type W",
        "Tensor type KV",
        "Methods",
        "Task families",
        "Quality vs memory and latency",
    ):
        assert f">{heading}</h2>" in text
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    probe = tmp_path / "probe.html"
    probe.write_text(
        text.replace(
            "</body>",
            """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  // layout at 1400 px: the page itself never scrolls sideways; a table wider than its box
  // scrolls inside a .scroll box; no figure is drawn wider than the column
  const page = document.documentElement.scrollWidth - window.innerWidth;
  const tables = [...document.querySelectorAll('table')];
  const loose = tables.filter(t => !t.closest('.scroll')).length;
  const wide = tables.filter(t => t.closest('.scroll') && t.closest('.scroll').scrollWidth > t.closest('.scroll').clientWidth).length;
  const big = imgs.filter(i => i.getBoundingClientRect().right > document.body.getBoundingClientRect().right + 1).length;
  const p = document.createElement('p'); p.id = 'probe';
  p.textContent = `loaded ${ok} of ${imgs.length}; width ${window.innerWidth} overflow ${page} loose ${loose} wide ${wide} big ${big}`;
  document.body.appendChild(p);
});</script></body>""",
        )
    )
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000"]
    proc = subprocess.run(
        [*common, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(
        r'<p id="probe">loaded (\d+) of (\d+); width (\d+) overflow (-?\d+) loose (\d+) wide (\d+) big (\d+)</p>',
        proc.stdout,
    )
    assert match, proc.stderr[-2000:]
    loaded, images, width, overflow, loose, wide, big = map(int, match.groups())
    assert loaded == images == n_figures
    assert width == 1400 and overflow <= 0 and loose == 0 and big == 0
    assert wide >= 1  # the paired table is wider than 1400 px: it scrolls in its box, the page does not
    # and the screenshot a reader would see: 1400 px wide, not blank
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] == 1400
        assert len(set(image.convert("L").resize((140, 100)).getdata())) > 10


# a report as wide as the qllm_eval suite on the default grid: every family, long metric names
WIDE_TASKS = {
    "wikitext2": ("basic_nlp", "ppl", False),
    "wikitext": ("basic_nlp", "word_perplexity", False),
    "lambada": ("basic_nlp", "acc", True),
    "arc_easy": ("basic_nlp", "acc", True),
    "arc_challenge": ("basic_nlp", "acc_norm", True),
    "mmlu": ("basic_nlp", "acc", True),
    "arc_icl": ("emergent", "acc_norm", True),
    "ifeval": ("emergent", "prompt_level_strict_acc", True),
    "gsm8k": ("emergent", "exact_match,flexible-extract", True),
    "self_calibration": ("emergent", "ece", False),
    "ethics_cm": ("ethics", "acc", True),
    "truthfulqa_mc1": ("ethics", "acc", True),
    "truthfulqa_mc2": ("ethics", "acc", True),
    "mt_bench": ("dialogue", "degeneration", False),
    "longeval_lines": ("long_context", "acc", True),
    "longeval_topics": ("long_context", "acc", True),
    "needle": ("long_context", "acc", True),
}
WIDE_SPECS = {
    "fp16": ("FP", "FP16", 1.0),
    "w8": ("W", "W8", 0.99),
    "w4g128": ("W", "W4g128", 0.9),
    "w3g128": ("W", "W3g128", 0.7),
    "w8a8": ("WA", "W8A8", 0.97),
    "w4a8": ("WA", "W4A8", 0.85),
    "w4a4": ("WA", "W4A4", 0.4),
    "kv4": ("KV", "KV4", 0.95),
    "kv3": ("KV", "KV3", 0.8),
    "kv2": ("KV", "KV2", 0.3),
}


def _wide_store(tmp_path) -> ResultStore:
    store = ResultStore(tmp_path, "wide")
    tasks = {
        name: {
            "task": f"qeval_{name}",
            "kind": "lm_eval",
            "family": fam,
            "primary_metric": metric,
            "higher_is_better": hib,
        }
        for name, (fam, metric, hib) in WIDE_TASKS.items()
    }
    tasks["wikitext2"]["kind"] = "perplexity"
    for method, shift in (("rtn", 0.0), ("gptq", 0.05)):
        for quant, (tensor_type, bits, keep) in WIDE_SPECS.items():
            if method == "gptq" and tensor_type != "W":
                continue
            keep = min(1.0, keep + shift) if quant != "fp16" else 1.0
            metrics: dict = {}
            for name, (_, metric, hib) in WIDE_TASKS.items():
                value = 0.5 * keep if hib else 10.0 / keep
                metrics[name] = {metric: value, f"{metric}_stderr": 0.02, "samples": 100}
            for length in (1000, 2000, 4000, 8000, 16000, 32000):
                metrics["needle"][f"acc@{length}tok"] = keep * 4000 / (4000 + length)
            metrics["mt_bench"].update(rep4=0.2 / keep, sentence_rep=0.1 / keep, nonword=0.05 / keep)
            store.write(
                {
                    "schema_version": SCHEMA_VERSION,
                    "hash": f"{quant}-{method}",
                    "label": f"smollm2-135m__{quant}__{method}",
                    "sweep": "wide",
                    "status": "ok",
                    "tasks": tasks,
                    "cell": {
                        "model": "smollm2-135m",
                        "quant": quant,
                        "method": method,
                        "suite": "qllm_eval",
                        "backend": "hf",
                        "tensor_type": tensor_type,
                        "bits": bits,
                    },
                    "metrics": metrics,
                }
            )
    return store


@pytest.mark.parametrize("which", ["fixture", "wide"])
def test_no_figure_has_overlapping_titles_or_labels(stores, tmp_path, monkeypatch, which):
    """Every figure of a small and of a qllm_eval-wide report, drawn: no title, axis label or
    tick label overlaps another (qeval.report.plots.text_overlaps on the drawn figure)."""
    from qeval.report import write
    from qeval.report.plots import text_overlaps

    found: dict[str, list[str]] = {}
    save = write.save_figure

    def checked(fig, out, name):
        found[name] = text_overlaps(fig)
        return save(fig, out, name)

    monkeypatch.setattr(write, "save_figure", checked)
    dirs = list(stores) if which == "fixture" else [_wide_store(tmp_path).dir]
    write.write_tables(dirs, tmp_path / "out")
    assert len(found) >= 8
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_overlap_check_sees_a_collision():
    """The check itself: two panels whose long titles run into each other are caught."""
    import matplotlib.pyplot as plt

    from qeval.report.plots import text_overlaps

    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    axes[0].set_title("a title far too long for its narrow panel, left")
    axes[1].set_title("and another one on the right")
    assert any("title" in hit for hit in text_overlaps(fig))
    axes[0].set_title("ok")
    axes[1].set_title("ok")
    assert text_overlaps(fig) == []
    plt.close(fig)


def _acc_cell(store: ResultStore, quant: str, families: dict[str, str], items: dict[str, dict]) -> None:
    """An ok cell of model ``m`` whose entries (``families``: entry -> family) are scored by
    accuracy, with the per-item tables behind them (``items``: entry -> columns with ``acc``)."""
    tensor_type, bits = SPECS[quant]
    store.write(
        {
            "schema_version": SCHEMA_VERSION,
            "hash": quant,
            "label": f"m__{quant}__rtn",
            "sweep": store.dir.name,
            "status": "ok",
            "tasks": {
                entry: {"family": family, "primary_metric": "acc", "higher_is_better": True}
                for entry, family in families.items()
            },
            "cell": {"model": "m", "quant": quant, "method": "rtn", "suite": "s", "backend": "hf"}
            | {"tensor_type": tensor_type, "bits": bits},
            "metrics": {
                entry: {"acc": sum(table["acc"]) / len(table["acc"]), "samples": len(table["acc"])}
                for entry, table in items.items()
            },
        },
        items,
    )


def _group_cell(store: ResultStore, quant: str, cm: list[float], virtue: list[float], mmlu_members: int) -> None:
    """A cell that ran a five-subset-style group (two members here) and an MMLU-style group of
    ``mmlu_members`` subjects, with the per-item tables behind them."""
    ethics_ids = [f"qeval_ethics_cm/{i}" for i in range(len(cm))] + [
        f"qeval_ethics_virtue/{i}" for i in range(len(virtue))
    ]
    mmlu_ids = [f"qeval_mmlu_s{k}/0" for k in range(mmlu_members)]
    _acc_cell(
        store,
        quant,
        {"ethics": "ethics", "mmlu": "basic_nlp"},
        {
            "ethics": {"id": ethics_ids, "acc": cm + virtue},
            "mmlu": {"id": mmlu_ids, "acc": _binary(mmlu_members, 0.5)},
        },
    )


def test_small_groups_are_shown_member_by_member(tmp_path):
    from qeval.report.frames import SUBTASKS_SHOWN, read_sweeps, subtask_frame
    from qeval.report.write import write_tables

    store = ResultStore(tmp_path, "groups")
    _group_cell(store, "fp16", cm=[1.0, 1.0, 0.0, 1.0], virtue=[1.0, 0.0], mmlu_members=SUBTASKS_SHOWN + 1)
    _group_cell(store, "w3g128", cm=[0.0, 1.0, 0.0, 0.0], virtue=[1.0, 0.0], mmlu_members=SUBTASKS_SHOWN + 1)
    table = subtask_frame(read_sweeps([store.dir])).reset_index()
    assert set(table["task"]) == {"ethics"}  # MMLU's subjects are too many to list
    row = lambda quant, sub: table[(table.quant == quant) & (table.subtask == sub)].iloc[0]  # noqa: E731
    assert (row("fp16", "qeval_ethics_cm")["value"], row("fp16", "qeval_ethics_cm")["n"]) == (0.75, 4)
    assert row("fp16", "qeval_ethics_cm")["stderr"] == pytest.approx(0.25)  # sd 0.5 over sqrt(4)
    assert row("w3g128", "qeval_ethics_cm")["value"] == 0.25  # the member quantization hurt
    assert row("w3g128", "qeval_ethics_virtue")["value"] == row("fp16", "qeval_ethics_virtue")["value"] == 0.5
    assert list(table["quant"]) == ["fp16", "fp16", "w3g128", "w3g128"]  # FP first, as every table
    markdown, _ = write_tables([store.dir], tmp_path / "out")
    assert (tmp_path / "out" / "subtasks.csv").exists() and "member by member" in markdown
    assert "Groups, member by member" in (tmp_path / "out" / "report.html").read_text()


def _choice_cell(store: ResultStore, quant: str, cm: list[int], virtue: list[int], arc: list[int]) -> None:
    """A cell's choices on a two-member ETHICS-style group and an ungrouped ARC-style entry; the
    gold answers follow from the lengths: cm 0 for the first 40 % of the items (12 of 30), virtue
    alternating, arc cycling through four choices."""
    n_cm, n_virtue, n_arc = len(cm), len(virtue), len(arc)
    cm_gold = [0] * (n_cm * 2 // 5) + [1] * (n_cm - n_cm * 2 // 5)
    virtue_gold, arc_gold = [i % 2 for i in range(n_virtue)], [i % 4 for i in range(n_arc)]
    acc = lambda choice, gold: [float(c == g) for c, g in zip(choice, gold)]  # noqa: E731
    _acc_cell(
        store,
        quant,
        {"ethics": "ethics", "arc": "basic_nlp"},
        {
            "ethics": {
                "id": [f"qeval_ethics_cm/{i}" for i in range(n_cm)]
                + [f"qeval_ethics_virtue/{i}" for i in range(n_virtue)],
                "acc": acc(cm, cm_gold) + acc(virtue, virtue_gold),
                "choice": cm + virtue,
                "target": cm_gold + virtue_gold,
            },
            "arc": {"id": [str(i) for i in range(n_arc)], "acc": acc(arc, arc_gold), "choice": arc, "target": arc_gold},
        },
    )


def test_constant_answers_are_named_with_their_base_rate(tmp_path):
    """A model that gives one choice to (nearly) every item scores that choice's base rate: the
    report names such entries -- per member of a small group -- and a quantized cell whose
    answers collapsed where the unquantized model's varied."""
    from qeval.report.frames import CONSTANT_SHARE, constant_answer_frame, read_sweeps
    from qeval.report.write import write_tables

    varied = [i % 4 for i in range(40)]
    store = ResultStore(tmp_path, "constant")
    # fp16: cm always 1 (the base rate 18/30), virtue varied, arc varied (and right)
    _choice_cell(store, "fp16", cm=[1] * 30, virtue=[i % 2 for i in range(30)], arc=varied)
    # w8a8: cm 29 of 30 times 1 (97 %), virtue varied, arc collapsed to choice 2 on 39 of 40
    _choice_cell(store, "w8a8", cm=[1] * 29 + [0], virtue=[(i + 1) % 2 for i in range(30)], arc=[2] * 39 + [0])
    table = constant_answer_frame(read_sweeps([store.dir])).reset_index()
    found = {(r.quant, r.task, r.subtask): r for r in table.itertuples()}
    assert set(found) == {
        ("fp16", "ethics", "qeval_ethics_cm"),
        ("w8a8", "ethics", "qeval_ethics_cm"),
        ("w8a8", "arc", ""),
    }
    cm = found[("fp16", "ethics", "qeval_ethics_cm")]
    assert (cm.n, cm.choice, cm.share) == (30, 1, 1.0)
    assert cm.gold_share == pytest.approx(18 / 30) and cm.accuracy == pytest.approx(18 / 30)  # the base rate
    w8_cm = found[("w8a8", "ethics", "qeval_ethics_cm")]
    assert w8_cm.share == pytest.approx(29 / 30) and w8_cm.share >= CONSTANT_SHARE
    assert w8_cm.accuracy == pytest.approx(17 / 30)  # its one other answer (0, last item) is wrong
    arc = found[("w8a8", "arc", "")]
    assert (arc.choice, arc.share, arc.gold_share) == (2, pytest.approx(39 / 40), pytest.approx(10 / 40))
    assert arc.accuracy == pytest.approx(10 / 40)  # right exactly where the gold is 2
    markdown, _ = write_tables([store.dir], tmp_path / "out")
    assert (tmp_path / "out" / "constant_answers.csv").exists() and "base rates" in markdown
    assert "ethics/qeval_ethics_cm (100% of 30 items)" in markdown  # the unquantized model's constant member
    assert "w8a8 (rtn) collapsed to one answer on arc (98% of 40 items)" in markdown  # only the quantized cell
    assert "collapsed to one answer on ethics" not in markdown  # constant at FP already: not a collapse
    assert "Same answer to every item" in (tmp_path / "out" / "report.html").read_text()


def test_a_recommendation_resting_on_a_constant_answer_says_so(tmp_path):
    from qeval.report.write import write_tables

    store = ResultStore(tmp_path, "constant-advice")
    n = 300  # identical answers on 600 ETHICS and 300 ARC items: confidently within 98 %
    same = dict(cm=[1] * n, virtue=[i % 2 for i in range(n)], arc=[i % 4 for i in range(n)])
    _choice_cell(store, "fp16", **same)
    _choice_cell(store, "w8a8", **same)
    write_tables([store.dir], tmp_path / "out")
    advice = pd.read_csv(tmp_path / "out" / "recommendations.csv").set_index("family")
    assert advice.loc["ethics", "recommended"].startswith("w8a8")
    assert (
        "caution: the unquantized model gives one answer to nearly every item of qeval_ethics_cm 100% of 30"
        in (advice.loc["ethics", "evidence"])
    )
    assert "caution" not in advice.loc["basic_nlp", "evidence"]  # arc's answers vary
