"""End to end through the real CLI: a 3-cell sweep on the tiny llama, resume, recovery from a
corrupt result file, and the report.

One sweep is run once per module (module-scoped fixtures); every qeval invocation costs
10-20 s on 2 cores, so the file makes four of them in all.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import require_eval_data

from qeval.results import SCHEMA_VERSION, ResultStore

SWEEP = ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128,kv4", "sweep_name=e2e"]
CELLS = {"fp16": ("FP", "FP16"), "w4g128": ("W", "W4g128"), "kv4": ("KV", "KV4")}


def _records(sweep_dir: Path) -> dict[str, tuple[Path, dict]]:
    out = {}
    for path in sorted(sweep_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        out[rec["cell"]["quant"]] = (path, rec)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def first_run(workdir, qeval_in_process):
    require_eval_data()
    results = workdir / "results"
    proc = qeval_in_process([*SWEEP, f"results_dir={results}"], workdir, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, results / "e2e"


@pytest.fixture(scope="module")
def second_run(first_run, workdir, qeval_in_process):
    _, sweep_dir = first_run
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep_dir.glob("*.json")}
    proc = qeval_in_process([*SWEEP, f"results_dir={sweep_dir.parent}"], workdir, timeout=300)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep_dir.glob("*.json")}
    return proc, before, after


# ---------------------------------------------------------------------------- first run


def test_sweep_writes_one_ok_record_per_cell(first_run):
    proc, sweep_dir = first_run
    files = sorted(sweep_dir.glob("*.json"))
    assert len(files) == 3
    assert not [p for p in sweep_dir.iterdir() if p.name.startswith(".tmp")]
    recs = _records(sweep_dir)
    assert set(recs) == set(CELLS)
    fingerprints = set()
    for quant, (path, rec) in recs.items():
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["schema_version"] == SCHEMA_VERSION
        assert rec["sweep"] == "e2e"
        # file name = <label>-<hash>.json, and the store finds it under that hash
        assert path.name == f"{rec['label']}-{rec['hash']}.json"
        assert rec["label"] == f"tiny-llama__{quant}__rtn"
        assert ResultStore(sweep_dir.parent, "e2e").finished(rec["hash"])["label"] == rec["label"]
        assert (rec["cell"]["tensor_type"], rec["cell"]["bits"]) == CELLS[quant]
        assert rec["cell"]["model"] == "tiny-llama" and rec["cell"]["suite"] == "tiny"
        # metrics
        wt = rec["metrics"]["wikitext2"]
        assert wt["windows"] == 2
        assert wt["tokens"] == 2 * 127
        assert math.isfinite(wt["ppl"]) and wt["ppl"] > 1
        assert wt["ppl"] == pytest.approx(math.exp(wt["nll"]), rel=1e-9)
        assert math.isfinite(wt["ppl_stderr"]) and wt["ppl_stderr"] >= 0
        lam = rec["metrics"]["lambada"]
        assert lam["samples"] == 8
        assert 0.0 <= lam["acc"] <= 1.0
        assert "acc_stderr" in lam and lam["acc_stderr"] >= 0
        # timings, provenance
        for key in ("load", "quantize", "eval", "total"):
            assert key in rec["timings"], key
        assert set(rec["timings"]["eval"]) == {"wikitext2", "lambada"}
        assert rec["timings"]["total"] > 0
        assert isinstance(rec["model_fingerprint"], str) and len(rec["model_fingerprint"]) == 16
        fingerprints.add(rec["model_fingerprint"])
        for pkg in ("python", "torch", "transformers", "lm_eval", "qeval"):
            assert rec["versions"].get(pkg), pkg
        # the identity is what the hash covers: no output locations in it
        assert "results_dir" not in rec["identity"] and "sweep_name" not in rec["identity"]
        assert rec["config"]["quant"]["name"] == quant
    # one model, loaded once: same fingerprint everywhere
    assert len(fingerprints) == 1
    # different cells, different hashes
    assert len({rec["hash"] for _, rec in recs.values()}) == 3


def test_quantization_changes_ppl(first_run):
    _, sweep_dir = first_run
    recs = _records(sweep_dir)
    ppl = {q: rec["metrics"]["wikitext2"]["ppl"] for q, (_, rec) in recs.items()}
    assert ppl["w4g128"] != ppl["fp16"]
    assert ppl["kv4"] != ppl["fp16"]
    # the quantized model is still the same model: within a factor of 2 of FP on this tiny net
    assert 0.5 < ppl["w4g128"] / ppl["fp16"] < 2.0


def test_sweep_log(first_run):
    proc, _ = first_run
    out = proc.stdout + proc.stderr
    assert "3 cells planned and validated" in out
    assert out.count("quantized in") == 3
    assert "3 ok" in out
    assert "wikitext2.ppl /FP" in out  # the table printed at the end
    assert "(0 already finished)" in out and "cell tiny-llama__fp16__rtn already finished" not in out
    assert "sweep: 3/3 cells done" in out


# ---------------------------------------------------------------------------- resume


def test_rerun_skips_finished_cells(second_run):
    proc, before, after = second_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len(before) == 3
    # byte-identical files, not rewritten (same mtime)
    assert after == before
    assert out.count("already finished") == 4  # the plan's count, then each cell
    assert "(3 already finished)" in out
    for quant in CELLS:
        assert f"cell tiny-llama__{quant}__rtn already finished" in out
    # no model loaded, nothing quantized or evaluated
    assert ": quantized in" not in out
    assert "loaded tiny-llama" not in out
    assert "wikitext2 ppl" not in out
    assert "3 already done" in out


def test_corrupt_result_is_recomputed(first_run, workdir, qeval_in_process, tmp_path):
    _, sweep_dir = first_run
    results = tmp_path / "results"
    (results / "e2e").mkdir(parents=True)
    for p in sweep_dir.glob("*.json*"):  # records and their per-item files
        shutil.copy2(p, results / "e2e" / p.name)
    recs = _records(results / "e2e")
    broken, good = recs["w4g128"][0], recs["w4g128"][1]
    untouched = {q: (p.read_bytes(), p.stat().st_mtime_ns) for q, (p, _) in recs.items() if q != "w4g128"}
    text = broken.read_text()
    broken.write_text(text[: len(text) // 2])  # a truncated file
    proc = qeval_in_process([*SWEEP, f"results_dir={results}"], tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the two intact cells are skipped, the broken one is computed again
    assert out.count(" already finished (") == 2
    assert "(2 already finished)" in out
    assert "cell tiny-llama__w4g128__rtn already finished" not in out
    assert out.count("quantized in") == 1
    assert "unreadable" in out
    rec = json.loads(broken.read_text())
    assert rec["status"] == "ok"
    assert rec["hash"] == good["hash"]
    # deterministic: the same numbers as the first time
    assert rec["metrics"]["wikitext2"]["ppl"] == pytest.approx(good["metrics"]["wikitext2"]["ppl"], rel=1e-6)
    assert rec["metrics"]["lambada"]["acc"] == good["metrics"]["lambada"]["acc"]
    assert rec["model_fingerprint"] == good["model_fingerprint"]
    for quant, (content, mtime) in untouched.items():
        path = recs[quant][0]
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (content, mtime)
    assert len(list((results / "e2e").glob("*.json"))) == 3


# ---------------------------------------------------------------------------- report


def test_report_cli(first_run, run_report, tmp_path):
    _, sweep_dir = first_run
    out_dir = tmp_path / "plots"
    proc = run_report([str(sweep_dir), "--out", str(out_dir)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out_dir / "table.csv").is_file() and (out_dir / "table.md").is_file()
    assert (out_dir / "scores_long.csv").is_file()
    table = pd.read_csv(out_dir / "table.csv")
    assert len(table) == 3
    assert set(table["bits"]) == {"FP16", "W4g128", "KV4"}
    assert list(table["tensor_type"]) == ["FP", "W", "KV"]  # FP first
    assert "wikitext2.ppl /FP" in table.columns and "lambada.acc" in table.columns
    fp = table[table.tensor_type == "FP"].iloc[0]
    assert fp["wikitext2.ppl /FP"] == pytest.approx(1.0, abs=1e-12)
    recs = _records(sweep_dir)
    ppl = {q: rec["metrics"]["wikitext2"]["ppl"] for q, (_, rec) in recs.items()}
    w = table[table.bits == "W4g128"].iloc[0]
    assert w["wikitext2.ppl"] == pytest.approx(ppl["w4g128"], rel=1e-9)
    assert w["wikitext2.ppl /FP"] == pytest.approx(ppl["w4g128"] / ppl["fp16"], rel=1e-9)
    md = (out_dir / "table.md").read_text()
    assert "wikitext2.ppl /FP" in md
    for label in ("FP16", "W4g128", "KV4"):
        assert sum(label in line for line in md.splitlines()) == 1, label
    # printed: the family summary (perplexity and LAMBADA accuracy are both basic NLP) and
    # the primary metrics; the full table is in the files
    families = pd.read_csv(out_dir / "families.csv")
    assert list(families.columns[-1:]) == ["basic_nlp"]
    fam = dict(zip(families["quant"], families["basic_nlp"]))
    assert fam["fp16"] == pytest.approx(1.0)
    acc = {q: rec["metrics"]["lambada"]["acc"] for q, (_, rec) in recs.items()}
    # the mean of FP/ppl (lower is better) and acc/FP_acc (higher is better), where FP's acc isn't 0
    if acc["fp16"] > 0:
        expected = (ppl["fp16"] / ppl["w4g128"] + acc["w4g128"] / acc["fp16"]) / 2
        assert fam["w4g128"] == pytest.approx(expected, rel=1e-9)
    assert (out_dir / "families.md").read_text().strip() in proc.stdout
    primary = pd.read_csv(out_dir / "primary.csv")
    assert {"wikitext2.ppl", "lambada.acc"} <= set(primary.columns) and "lambada.perplexity" not in primary.columns


def test_report_cli_on_empty_folder(report_in_process, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = report_in_process([str(tmp_path / "empty"), "--out", str(tmp_path / "plots")], tmp_path)
    assert proc.returncode == 2
    assert "no cell records under" in proc.stderr


# ---------------------------------------------------------------------------- report, synthetic records


def _synthetic(
    store: ResultStore, quant: str, ppl: float, cell_hash: str, backend: str = "hf", acc: float | None = None
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qeval.cell import register_configs
    from qeval.cli import CONF_DIR
    from qeval.config import bits_label, tensor_type

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        q = compose("config", overrides=["model=tiny-llama", "suite=tiny", f"quant={quant}"]).quant
    GlobalHydra.instance().clear()
    store.write(
        {
            "schema_version": SCHEMA_VERSION,
            "hash": cell_hash,
            "label": f"m__{quant}__rtn",
            "sweep": "syn",
            "status": "ok",
            "cell": {
                "model": "m",
                "quant": quant,
                "method": "rtn",
                "suite": "tiny",
                "backend": backend,
                "tensor_type": tensor_type(q),
                "bits": bits_label(q),
            },
            "metrics": {
                "wikitext2": {"ppl": ppl, "ppl_stderr": 0.1, "windows": 2},
                **({"arc": {"acc": acc, "acc_stderr": 0.02, "samples": 500}} if acc is not None else {}),
            },
        }
    )


def test_report_normalizes_by_fp(tmp_path):
    from qeval.report.write import write_tables

    store = ResultStore(tmp_path, "syn")
    _synthetic(store, "fp16", 10.0, "a1")
    _synthetic(store, "w4g128", 12.0, "a2")
    _synthetic(store, "w3g128", 15.0, "a3")
    store.write(
        {
            "schema_version": SCHEMA_VERSION,
            "hash": "a4",
            "label": "m__w2g64__rtn",
            "sweep": "syn",
            "status": "failed",
            "cell": {},
            "metrics": {},
        }
    )
    _, files = write_tables(store.dir, tmp_path / "out")
    table = pd.read_csv(files[1])
    assert list(table["bits"]) == ["FP16", "W4g128", "W3g128"]  # failed cell left out
    assert list(table["wikitext2.ppl /FP"]) == pytest.approx([1.0, 1.2, 1.5])


def test_report_keeps_cells_with_same_bits_label(tmp_path):
    from qeval.report.write import write_tables

    store = ResultStore(tmp_path, "syn")
    _synthetic(store, "fp16", 10.0, "b1")
    _synthetic(store, "w8a8", 10.5, "b2")
    _synthetic(store, "w8a8-fp8", 10.7, "b3")
    _synthetic(store, "w8a8-static", 11.0, "b4")
    _, files = write_tables(store.dir, tmp_path / "out")
    table = pd.read_csv(files[1])
    assert len(table) == 4
    assert sorted(table["wikitext2.ppl"]) == [10.0, 10.5, 10.7, 11.0]


def test_report_flags_fake_vs_real_kernel_disagreement(tmp_path, report_in_process):
    """Cells run on both backends are paired; perplexity agrees within 1 % relative, accuracy
    within 2 standard errors of the difference (sqrt(0.02^2 + 0.02^2) = 0.028 -> 0.057)."""
    store = ResultStore(tmp_path, "syn")
    _synthetic(store, "fp16", 10.0, "c1", acc=0.50)
    _synthetic(store, "fp16", 10.05, "c2", backend="vllm", acc=0.52)  # 0.5 % and 0.02: agree
    _synthetic(store, "w8a8", 11.0, "c3", acc=0.50)
    _synthetic(store, "w8a8", 11.2, "c4", backend="vllm", acc=0.44)  # 1.8 % and 0.06: disagree
    _synthetic(store, "w4g128", 12.0, "c5")  # hf only: not paired
    proc = report_in_process([str(store.dir), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 4 agree, 2 DISAGREE" in proc.stdout
    table = pd.read_csv(tmp_path / "out" / "agreement.csv")
    verdict = {(r.quant, r.metric): r.agree for r in table.itertuples()}
    assert verdict == {
        ("fp16", "wikitext2.ppl"): True,
        ("fp16", "arc.acc"): True,
        ("w8a8", "wikitext2.ppl"): False,
        ("w8a8", "arc.acc"): False,
    }
    row = table[(table.quant == "w8a8") & (table.metric == "arc.acc")].iloc[0]
    assert row.tolerance == pytest.approx(2 * (2 * 0.02**2) ** 0.5)
    # a looser tolerance from the command line changes the verdict
    proc = report_in_process(
        [str(store.dir), "--out", str(tmp_path / "out2"), "--ppl-rtol", "0.02", "--n-se", "3"], tmp_path
    )
    assert "4 of 4 agree" in proc.stdout
    # the main table keeps the two backends as separate rows
    assert len(pd.read_csv(tmp_path / "out" / "table.csv")) == 5


def test_every_task_of_every_cell_keeps_its_items(first_run):
    """Per-item tables beside each record, one per suite entry, joinable on ids across cells,
    and the report pairs every quantized cell with the FP cell on them."""
    from qeval.report.frames import read_sweeps
    from qeval.report.verdicts import paired_frame
    from qeval.results import record_items

    _, sweep_dir = first_run
    records = read_sweeps([sweep_dir])
    tables = {rec["cell"]["quant"]: record_items(rec) for rec in records}
    assert set(tables) == set(CELLS)
    for quant, items in tables.items():
        assert items is not None and set(items) == {"wikitext2", "lambada"}, quant
        assert len(items["lambada"]["id"]) == 8 and set(items["lambada"]["acc"]) <= {0.0, 1.0}
        assert len(items["wikitext2"]["id"]) == 2  # one row per perplexity window
    assert tables["fp16"]["lambada"]["id"] == tables["w4g128"]["lambada"]["id"]
    size = sum(rec["items"]["bytes"] for rec in records)
    assert size < 20_000  # no prompts, no generations: a few hundred bytes a task here
    paired = paired_frame(records)
    assert len(paired) == 2 * 2 and set(paired.verdict) <= {"within", "loss", "inconclusive"}
    assert (paired.n > 0).all()
