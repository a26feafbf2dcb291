"""Per-item records: lm-eval's logged samples become one small table per task, written
atomically beside the cell's record before it, read back, and required by resume."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from qeval.eval.items import ANSWER_CHARS, check_columns, items_path, lm_eval_items, read_items, write_items
from qeval.results import SCHEMA_VERSION, ResultStore, iter_records, record_items


def _mc_example(doc_id, target, lls, acc, filt="none"):
    return {
        "doc_id": doc_id,
        "target": target,
        "filtered_resps": [(ll, False) for ll in lls],
        "filter": filt,
        "metrics": ["acc", "acc_norm"],
        "acc": acc,
        "acc_norm": acc,
        "doc": {"question": "a long prompt that is never kept " * 20},
    }


def test_multiple_choice_rows_keep_choice_gold_and_metrics_not_prompts():
    samples = {"arc": [_mc_example(0, 1, [-3.0, -1.0, -2.0], 1.0), _mc_example(1, 2, [-0.5, -1.5, -2.5], 0.0)]}
    table = lm_eval_items(samples)
    assert table["id"] == ["0", "1"]
    assert table["choice"] == [1, 0] and table["target"] == [1, 2]
    assert table["gold_ll"] == [-1.0, -2.5]
    assert table["acc"] == [1.0, 0.0] and np.mean(table["acc"]) == 0.5
    assert "doc" not in table and "question" not in json.dumps(table)


def test_group_ids_name_the_subtask_and_filters_sit_side_by_side():
    samples = {
        "mmlu_a": [_mc_example(0, 0, [-1.0, -2.0], 1.0)],
        "mmlu_b": [_mc_example(0, 1, [-1.0, -2.0], 0.0)],
    }
    assert lm_eval_items(samples)["id"] == ["mmlu_a/0", "mmlu_b/0"]
    gen = [
        {"doc_id": 3, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0, "filtered_resps": ["42"]},
        {"doc_id": 3, "filter": "flexible-extract", "metrics": ["exact_match"], "exact_match": 0.0,
         "filtered_resps": ["x" * 500]},
    ]  # fmt: skip
    table = lm_eval_items({"gsm8k": gen})
    assert table["id"] == ["3"]
    assert table["exact_match[strict-match]"] == [1.0] and table["exact_match[flexible-extract]"] == [0.0]
    assert len(table["answer"][0]) == ANSWER_CHARS  # the last filter's answer, truncated


def test_check_columns_names_what_is_wrong():
    with pytest.raises(ValueError, match="'id' column"):
        check_columns({"acc": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        check_columns({"id": ["a", "b"], "acc": [1]})
    with pytest.raises(ValueError, match="repeats 'a'"):
        check_columns({"id": ["a", "a"]})
    out = check_columns({"id": [1, 2], "x": [np.float32(0.5), float("nan")], "ok": [np.bool_(True), None]})
    assert out == {"id": ["1", "2"], "x": [0.5, None], "ok": [True, None]}


def test_items_file_round_trips_and_a_torn_file_reads_as_none(tmp_path):
    path = tmp_path / "cell-0123.items.json.gz"
    tables = {"arc": {"id": ["0"], "acc": [1.0]}, "plugin": None}
    size = write_items(path, tables)
    assert size == path.stat().st_size and read_items(path) == tables
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    path.write_bytes(path.read_bytes()[: size // 2])  # a half-written file (e.g. copied mid-write)
    assert read_items(path) is None
    path.write_bytes(gzip.compress(b'{"version": 999, "tasks": {}}'))
    assert read_items(path) is None


def _record(status="ok"):
    return {"schema_version": SCHEMA_VERSION, "hash": "0123456789abcdef", "label": "tiny", "status": status}


def test_store_writes_items_before_the_record_and_resume_needs_both(tmp_path):
    store = ResultStore(tmp_path, "sweep")
    tables = {"arc": {"id": ["0", "1"], "acc": [1.0, 0.0]}}
    path = store.write(_record(), tables)
    assert items_path(path).exists()
    record = json.loads(path.read_text())
    assert record["items"]["rows"] == {"arc": 2} and record["items"]["bytes"] == items_path(path).stat().st_size
    assert store.finished("0123456789abcdef") is not None
    (rec,) = iter_records(tmp_path)
    assert record_items(rec) == tables
    items_path(path).unlink()  # a record whose items are gone is not a finished cell
    assert store.finished("0123456789abcdef") is None
    # a record without items (failed cells, older sweeps) is judged by its status alone
    store.write(_record())
    assert store.finished("0123456789abcdef") is not None
