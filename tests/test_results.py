"""The result store: atomic writes, stable cell hashes, finished() semantics."""

from __future__ import annotations

import json

import pytest

from qeval.results import SCHEMA_VERSION, ResultStore, iter_records, package_versions, stable_hash


def _record(cell_hash="0123456789abcdef", label="tiny-llama__w4g128__rtn", status="ok", **extra):
    return {
        "schema_version": SCHEMA_VERSION,
        "hash": cell_hash,
        "label": label,
        "status": status,
        "metrics": {"wikitext2": {"ppl": 12.5}},
        **extra,
    }


def _stray_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp") or p.suffix == ".tmp")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    store = ResultStore(tmp_path, "sweep")
    rec = _record()
    path = store.write(rec)
    assert path == tmp_path / "sweep" / "tiny-llama__w4g128__rtn-0123456789abcdef.json"
    assert [p.name for p in store.dir.iterdir()] == [path.name]
    assert _stray_files(store.dir) == []
    assert json.loads(path.read_text()) == rec
    # overwrite in place (a rerun): still exactly one file, with the new content
    rec2 = _record(metrics={"wikitext2": {"ppl": 13.0}})
    assert store.write(rec2) == path
    assert [p.name for p in store.dir.iterdir()] == [path.name]
    assert json.loads(path.read_text())["metrics"]["wikitext2"]["ppl"] == 13.0


def test_failed_write_keeps_previous_file(tmp_path):
    store = ResultStore(tmp_path, "sweep")
    path = store.write(_record())
    before = path.read_bytes()
    bad = _record()
    bad["self"] = bad  # circular: json.dump fails halfway
    with pytest.raises(ValueError):
        store.write(bad)
    # the previous result is intact (the rename never happened)
    assert path.read_bytes() == before
    assert store.finished("0123456789abcdef")["status"] == "ok"
    # and a half-written temporary file is never taken for a result
    assert [r["hash"] for r in iter_records(tmp_path)] == ["0123456789abcdef"]


def test_failed_write_removes_its_temp_file(tmp_path):
    store = ResultStore(tmp_path, "sweep")
    bad = _record()
    bad["self"] = bad
    with pytest.raises(ValueError):
        store.write(bad)
    assert _stray_files(store.dir) == []


def test_result_file_mode_follows_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = ResultStore(tmp_path, "s").write(_record())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_label_is_made_filename_safe(tmp_path):
    store = ResultStore(tmp_path, "s")
    path = store.path_for("abc", "org/model name__w4__rtn")
    assert path.name == "org_model_name__w4__rtn-abc.json"
    assert path.parent == tmp_path / "s"


def test_stable_hash_independent_of_key_order():
    a = {"model": {"name": "m", "dtype": "float32"}, "quant": {"w": {"bits": 4, "group_size": 128}}, "seed": 0}
    b = {"seed": 0, "quant": {"w": {"group_size": 128, "bits": 4}}, "model": {"dtype": "float32", "name": "m"}}
    assert stable_hash(a) == stable_hash(b)
    assert len(stable_hash(a)) == 16
    assert all(c in "0123456789abcdef" for c in stable_hash(a))
    # any value change changes the hash
    c = {**a, "quant": {"w": {"bits": 3, "group_size": 128}}}
    assert stable_hash(c) != stable_hash(a)
    assert stable_hash({**a, "seed": 1}) != stable_hash(a)
    # deterministic across calls (no process-random salt): a fixed literal
    assert stable_hash({"a": 1}) == stable_hash({"a": 1})
    import hashlib

    assert stable_hash({"b": [1, 2], "a": None}) == hashlib.sha256(b'{"a":null,"b":[1,2]}').hexdigest()[:16]


def test_finished_semantics(tmp_path):
    store = ResultStore(tmp_path, "s")
    assert store.finished("aaaa") is None  # missing (the folder does not even exist)
    store.write(_record("aaaa", status="ok"))
    store.write(_record("bbbb", status="skipped", reason="unsupported"))
    store.write(_record("cccc", status="failed", reason="RuntimeError: boom"))
    assert store.finished("aaaa")["metrics"]["wikitext2"]["ppl"] == 12.5
    assert store.finished("bbbb")["status"] == "skipped"
    assert store.finished("cccc") is None  # failed cells are retried
    assert store.find("cccc") is not None


@pytest.mark.parametrize("content", [b"", b'{"status": "ok", "metr', b"not json at all"])
def test_finished_none_for_unreadable_file(tmp_path, content):
    store = ResultStore(tmp_path, "s")
    path = store.write(_record("dddd"))
    path.write_bytes(content)
    assert store.finished("dddd") is None
    # iter_records skips it as well
    assert list(iter_records(tmp_path)) == []


def test_finished_none_for_binary_garbage(tmp_path):
    store = ResultStore(tmp_path, "s")
    path = store.write(_record("eeee"))
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert store.finished("eeee") is None


def test_finished_none_for_non_object_json(tmp_path):
    store = ResultStore(tmp_path, "s")
    path = store.write(_record("ffff"))
    path.write_text("null")
    assert store.finished("ffff") is None


def test_iter_records_filters(tmp_path):
    store = ResultStore(tmp_path, "s")
    store.write(_record("1111"))
    store.write(_record("2222", status="failed"))
    # other JSON that is not a result record, hidden files and Hydra's folder are ignored
    (store.dir / "notes.json").write_text(json.dumps({"hello": 1}))
    (store.dir / ".tmp-x.json").write_text(json.dumps(_record("3333")))
    hydra = store.dir / ".hydra" / "2026"
    hydra.mkdir(parents=True)
    (hydra / "r.json").write_text(json.dumps(_record("4444")))
    recs = list(iter_records(tmp_path))
    assert sorted(r["hash"] for r in recs) == ["1111", "2222"]
    assert all(r["_path"].endswith(".json") for r in recs)


def test_package_versions_names_the_stack():
    v = package_versions()
    for key in ("python", "qeval", "torch", "transformers", "lm_eval"):
        assert key in v and v[key]
    import importlib.metadata as md

    assert v["qeval"] == md.version("qeval")  # what pip installed, not a guess


def test_fp_baseline_is_one_cell_across_methods():
    """quant=fp16 x method=rtn,gptq is one baseline (same hash, computed once per sweep);
    quantized cells of different methods stay distinct."""
    from qeval.cell import build_cell
    from qeval.cli import compose_config

    def cell_hash(*overrides: str) -> str:
        return stable_hash(build_cell(compose_config(["model=tiny-llama", "suite=tiny", *overrides])).identity())

    assert (
        cell_hash("quant=fp16", "method=rtn")
        == cell_hash("quant=fp16", "method=gptq")
        == cell_hash("quant=fp16", "method=awq")
    )
    assert cell_hash("quant=w4g128", "method=rtn") != cell_hash("quant=w4g128", "method=gptq")
    assert cell_hash("quant=fp16") != cell_hash("quant=fp16", "seed=1")


def test_a_weight_cell_recorded_without_a_coverage_account_is_recomputed(tmp_path):
    """Before coverage accounts, W cells of MoE models left their experts unquantized and said
    W4: such a record is not reused; KV-only and unquantized records without one still are."""
    store = ResultStore(tmp_path, "sweep")
    store.write(_record("aaaa000000000000", cell={"tensor_type": "W"}))
    store.write(_record("bbbb000000000000", cell={"tensor_type": "W"}, coverage={"share": 1.0}))
    store.write(_record("cccc000000000000", cell={"tensor_type": "KV"}))
    store.write(_record("dddd000000000000", cell={"tensor_type": "WA+KV"}))
    assert store.finished("aaaa000000000000") is None and store.finished("dddd000000000000") is None
    assert store.finished("bbbb000000000000") is not None and store.finished("cccc000000000000") is not None
