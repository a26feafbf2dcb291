"""Bad input, caught before any model loads: every key validated with its value and the allowed
values in the message, exit statuses as documented (0 finished, 1 a cell failed, 2 refused), a
results folder that cannot be written, and two launches into one sweep folder.

Most cases run the planner's own checks in this process (``build_cell`` + ``preflight``, the
two calls the sweep's plan makes per cell); the exit statuses and the concurrency need the real
command, in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE_ENV, require_eval_data

from qeval.config import ConfigError

TINY = ["model=tiny-llama", "suite=tiny"]


def _check(*overrides: str, tmp: Path | None = None) -> None:
    """The sweep's checks of one cell, as its plan runs them (raises ConfigError)."""
    from qeval.cell import build_cell, preflight
    from qeval.cli import compose_config

    results = [f"results_dir={tmp}"] if tmp else []
    preflight(build_cell(compose_config([*overrides, *results])))


def _refused(*overrides: str, tmp: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        _check(*overrides, tmp=tmp)
    return str(caught.value)


# --------------------------------------------------------------------------- model files


@pytest.fixture
def model_folders(tmp_path):
    """A folder that does not exist, an empty one, one with a broken config.json, one with a
    config but no tokenizer, and a real (tiny) model folder."""
    from qeval.models.tiny import build_tiny_model, byte_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    no_tok = tmp_path / "no_tokenizer"
    build_tiny_model("llama", 0, torch.float32).save_pretrained(no_tok)
    good = tmp_path / "good"
    build_tiny_model("llama", 0, torch.float32).save_pretrained(good)
    byte_tokenizer().save_pretrained(good)
    return {"missing": tmp_path / "nope", "empty": empty, "garbage": garbage, "no_tokenizer": no_tok, "good": good}


@pytest.mark.parametrize(
    "folder, message",
    [
        ("missing", "an existing folder holding a model's config.json"),
        ("empty", "has no config.json"),
        ("garbage", "config.json is not valid JSON"),
        ("no_tokenizer", "has no tokenizer"),
    ],
)
def test_local_model_folder_is_checked_before_loading(model_folders, tmp_path, folder, message):
    msg = _refused("model=local", f"model.path={model_folders[folder]}", "suite=tiny", tmp=tmp_path / "r")
    assert "model.path" in msg and str(model_folders[folder]) in msg and message in msg


def test_a_real_local_folder_passes_and_its_limits_are_read(model_folders, tmp_path):
    _check("model=local", f"model.path={model_folders['good']}", "suite=tiny", tmp=tmp_path / "r")
    msg = _refused(
        "model=local", f"model.path={model_folders['good']}", "suite=tiny", "quant=w4g128", "quant.w.group_size=4096"
    )
    assert "quant.w.group_size=4096" in msg and "at most 160" in msg


def test_hub_ids_are_checked_against_the_cache_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _refused("model=hub", "model.path=nobody-has/this-model-xyz", "suite=tiny")
    assert "model.path='nobody-has/this-model-xyz'" in msg and "cache" in msg
    msg = _refused("model=hub", "model.path=bad..id", "suite=tiny")
    assert "not a Hub id" in msg
    msg = _refused("model=hub", f"model.path={tmp_path}/no/such/folder", "suite=tiny")
    assert "an existing folder, or a Hub id" in msg


def test_hub_id_in_the_local_cache_passes_offline(tmp_path, monkeypatch):
    """The real Hub path, on local files: a model in the Hugging Face cache layout is found
    offline by the same lookup from_pretrained uses."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from qeval.models import checks

    checks._check_hub.cache_clear()
    checks.check_model_files(checks.ModelSpec(name="x", source="hub", path="someone/tiny"))
    checks._check_hub.cache_clear()


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (["seed=-1"], "seed=-1", "0..4294967295"),
        (["seed=4294967296"], "seed=4294967296", "0..4294967295"),
        (["calib.seed=-5"], "calib.seed=-5", "0..4294967295"),
        (["backend.threads=-1"], "backend.threads=-1", "a positive integer"),
        (["backend.threads=0"], "backend.threads=0", "a positive integer"),
        (["suite.tasks.lambada.batch_size=0"], "suite.tasks.lambada.batch_size=0", "a positive integer or auto"),
        (["suite.tasks.lambada.batch_size=big"], "suite.tasks.lambada.batch_size='big'", "a positive integer or auto"),
        (["method=gptq", "quant=w4g128", "calib.seqlen=0"], "calib.seqlen=0", "a positive integer"),
        (["method=gptq", "quant=w4g128", "calib.seqlen=100000000"], "calib.seqlen=100000000", "1..512, the context"),
        (["calib.nsamples=0", "method=gptq", "quant=w4g128"], "calib.nsamples=0", "a positive integer"),
        (["quant=w4g128", "quant.w.group_size=100000"], "quant.w.group_size=100000", "at most 160"),
        (["quant=w4g128", "quant.w.group_size=0"], "quant.w.group_size=0", "a positive integer"),
        (["quant=w4g128", "quant.w.bits=1"], "quant.w.bits=1", "2..8"),
        (["quant=w4g128", "quant.w.bits=9"], "quant.w.bits=9", "2..8"),
        (["quant=w4g128", "quant.w.format=int5"], "quant.w.format='int5'", "one of int"),
        (["quant=w8a8-fp8", "quant.w.bits=4"], "quant.w.bits=4", "8 for format fp8_e4m3"),
        (["quant=w4g128", "quant.w.granularity=row"], "quant.w.granularity='row'", "tensor, channel, group"),
        (["quant=w4a8", "quant.a.granularity=group"], "quant.a.granularity='group'", "tensor, token"),
        (["quant=kv4", "quant.kv.residual=-1"], "quant.kv.residual=-1", ">= 0"),
        (["suite.tasks.lambada.limit=0"], "suite.tasks.lambada.limit=0", "a positive integer"),
        (["suite.tasks.lambada.task=no_such_task"], "no_such_task", "neither a native task nor an lm-eval task"),
        (["sweep_name="], "sweep_name=''", "a plain folder name"),
        (["sweep_name=../../x"], "sweep_name='../../x'", "a plain folder name"),
        (["sweep_name=.hidden"], "sweep_name='.hidden'", "a plain folder name"),
        (["memory_limit_gib=0"], "memory_limit_gib=0", "a positive number"),
        (["model.family=nope"], "model.family='nope'", "llama"),
        (["backend.device=tpu"], "backend.device='tpu'", "cpu"),
        (["backend.offload=sometimes"], "backend.offload='sometimes'", "auto"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(tmp_path, overrides, key, allowed):
    require_eval_data()
    msg = _refused(*TINY, *overrides, tmp=tmp_path)
    assert key in msg and allowed in msg, msg


def test_a_cuda_device_on_a_cpu_only_machine_is_refused_in_preflight(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    msg = _refused(*TINY, "backend.device=cuda", tmp=tmp_path)
    assert "backend.device='cuda'" in msg and "sees no" in msg


# --------------------------------------------------------------------------- task plugins

PLUGIN = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
{extra}doc_to_text: "Q: {{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
  family: ethics
  primary_metric: acc
  higher_is_better: true
"""


@pytest.fixture
def plugins(tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n" for i in range(4))
    )
    folders = {}
    for name, text in {
        "ok": PLUGIN.format(name="plug_ok", data=data, extra=""),
        "no_data": PLUGIN.format(name="plug_no_data", data=tmp_path / "gone" / "missing.jsonl", extra=""),
        "no_module": PLUGIN.format(
            name="plug_no_module", data=data, extra="process_docs: !function nosuchmodule.process\n"
        ),
        "malformed": "task: plug_malformed\ndataset_path: json\n  dataset_kwargs: [unclosed\n",
    }.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / f"{name}.yaml").write_text(text)
    return folders


@pytest.mark.parametrize(
    "folder, task, message",
    [
        ("no_data", "plug_no_data", "reads the data file"),
        ("no_module", "plug_no_module", "Cannot import module 'nosuchmodule'"),
        ("malformed", "plug_malformed", "malformed YAML at"),
        ("malformed", None, "malformed YAML at"),  # a broken file in the folder, even when no entry uses it
    ],
)
def test_task_plugins_are_resolved_before_the_first_cell(plugins, tmp_path, folder, task, message):
    require_eval_data()
    add = [f"+tasks.add.mine={{task:{task}}}"] if task else []
    msg = _refused(*TINY, f"tasks.include=[{plugins[folder]}]", *add, tmp=tmp_path / "r")
    assert message in msg, msg
    if folder == "malformed":
        assert f"{plugins[folder] / 'malformed.yaml'}:3:" in msg  # file and line
    else:
        assert "suite.tasks.mine" in msg and task in msg


def test_a_good_plugin_passes(plugins, tmp_path):
    require_eval_data()
    _check(*TINY, f"tasks.include=[{plugins['ok']}]", "+tasks.add.mine={task:plug_ok}", tmp=tmp_path / "r")


def test_a_missing_launcher_plugin_names_its_package():
    from omegaconf import OmegaConf

    from qeval.sweep import check_launcher

    target = "hydra_plugins.hydra_rq_launcher.rq_launcher.RQLauncher"
    config = OmegaConf.create(
        {"hydra": {"launcher": {"_target_": target}, "runtime": {"choices": {"hydra/launcher": "rq"}}}}
    )
    try:
        __import__("hydra_plugins.hydra_rq_launcher")
        pytest.skip("hydra-rq-launcher is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit) as caught:
        check_launcher(config)
    assert caught.value.code == 2


# --------------------------------------------------------------------------- the real command


def _run(args: list[str], cwd: Path, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    from conftest import run_script

    t0 = time.monotonic()
    # Hydra's argument parser takes -m only before the overrides
    args = ["-m", *(a for a in args if a != "-m")] if "-m" in args else args
    proc = run_script("qeval", args, cwd, timeout)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["quant.w.bitz=4", "quant=w4g128"], "quant.w.bitz"),  # a typo Hydra catches at composition
        (["quant=w5z"], "w5z"),  # an unknown preset (Hydra)
        (["-m", "quant=fp16,w4g128", "seed=-1"], "seed=-1"),  # a value qeval's plan refuses
        (["-m", "quant=fp16,w4g128", "model=local", "model.path=/nonexistent"], "model.path='/nonexistent'"),
        (["-m", "quant=fp16", "hydra/launcher=ray"], "pip install hydra-ray-launcher"),
        (["hydra.mode=RUN", "quant=w4g128", "seed=-1"], "seed=-1"),  # one cell, no sweep plan
    ],
)
def test_refused_sweeps_exit_2_before_any_cell(tmp_path, args, expected):
    if "hydra/launcher=ray" in args:
        try:
            __import__("hydra_plugins.hydra_ray_launcher")
            pytest.skip("hydra-ray-launcher is installed here")
        except ImportError:
            pass
    results = tmp_path / "results"
    proc, seconds = _run([*TINY, *args, f"results_dir={results}"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert expected in out and "Traceback" not in out
    assert not list(results.rglob("*.json")), "no cell may have run"
    assert "loaded tiny-llama" not in out


def test_exit_statuses_finished_and_failed(tmp_path, plugins):
    """0: every cell ok or skipped; 1: a cell failed (a native plugin that raises; a single run,
    hydra.mode=RUN: a sweep's failed cell is tests/test_resume.py's)."""
    require_eval_data()
    ok, _ = _run([*TINY, "-m", "quant=fp16,kv4", "method=smoothquant", f"results_dir={tmp_path / 'ok'}"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "skipped" in ok.stdout  # smoothquant cannot make a KV-only cell: skipped is finished
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "boom.py").write_text(
        textwrap.dedent(
            """
            from qeval.eval.registry import NativeTask, register_task

            @register_task
            class Boom(NativeTask):
                name = "boom"
                family = "dialogue"
                primary_metric = "x"
                higher_is_better = True

                def evaluate(self, ctx):
                    raise RuntimeError("boom")
            """
        )
    )
    failed, _ = _run(
        [
            *TINY,
            "hydra.mode=RUN",
            "quant=fp16",
            f"tasks.include=[{crash}]",
            "+tasks.add.b={task:boom}",
            f"results_dir={tmp_path / 'f'}",
        ],
        tmp_path,
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "RuntimeError: boom" in failed.stdout + failed.stderr


def test_a_results_folder_that_turns_read_only_stops_the_sweep(tmp_path):
    """The first cell's task makes the sweep folder read-only (chattr +i as root, where
    permissions do not bind, else chmod): that cell cannot be recorded and the sweep stops with
    one line, before the second cell is quantized."""
    require_eval_data()
    results = tmp_path / "results"
    sweep = results / "ro"
    sweep.mkdir(parents=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(sweep)]).returncode != 0:
            pytest.skip("running as root without chattr +i: a folder cannot be made read-only here")
        subprocess.run(["chattr", "-i", str(sweep)], check=True)
        freeze = f"subprocess.run(['chattr', '+i', {str(sweep)!r}], check=True)"
        thaw = ["chattr", "-i", str(sweep)]
    else:
        freeze = f"os.chmod({str(sweep)!r}, 0o555)"
        thaw = ["chmod", "755", str(sweep)]
    plugin = tmp_path / "freeze"
    plugin.mkdir()
    (plugin / "freeze.py").write_text(
        textwrap.dedent(
            f"""
            import os, subprocess
            from qeval.eval.registry import NativeTask, register_task

            @register_task
            class Freeze(NativeTask):
                name = "freeze"
                family = "dialogue"
                primary_metric = "x"
                higher_is_better = True

                def evaluate(self, ctx):
                    {freeze}
                    return {{"x": 1.0}}
            """
        )
    )
    try:
        proc, _ = _run(
            [
                *TINY,
                "-m",
                "quant=fp16,w4g128,kv4",
                f"tasks.include=[{plugin}]",
                "+tasks.add.f={task:freeze}",
                f"results_dir={results}",
                "sweep_name=ro",
            ],
            tmp_path,
        )
    finally:
        subprocess.run(thaw, check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qeval: stopping the sweep")]
    assert len(lines) == 1 and str(sweep) in lines[0] and "cannot be written" in lines[0]
    assert "starting cell 1" not in err  # the second cell never started
    assert not list(sweep.glob("*.json"))


def test_two_concurrent_launches_compute_each_cell_once(tmp_path):
    """The same 4-cell sweep launched twice, 1 s apart, into one folder: each cell is computed by
    one process (its claim), each launch has its own Hydra folder and reports all 4 cells, and
    the records equal a single launch's."""
    require_eval_data()
    from conftest import _script

    cells = ["-m", *TINY, "quant=fp16,w4g128,w8a8,kv4", "backend.threads=1", "sweep_name=c"]
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("HYDRA_FULL_ERROR", None)
    shared = tmp_path / "shared"
    launches = []
    for _ in range(2):
        launches.append(
            subprocess.Popen(
                [*_script("qeval"), *cells, f"results_dir={shared}"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(1)
    outs = [p.communicate(timeout=400)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n".join(o[-3000:] for o in outs)
    computed = [line for o in outs for line in o.splitlines() if ": ok -> " in line]
    labels = sorted(line.split("cell ", 1)[1].split(":", 1)[0] for line in computed)
    assert len(labels) == 4 and len(set(labels)) == 4, labels  # each cell once, over both launches
    assert all("(4 ok)" in o for o in outs)
    assert len(list((shared / "c" / ".hydra").iterdir())) == 2
    assert not list((shared / "c" / ".claims").glob("*.json"))  # released
    single, _ = _run([*cells, f"results_dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    def records(folder: Path) -> dict[str, dict]:
        return {p.name: json.loads(p.read_text())["metrics"] for p in sorted((folder / "c").glob("*.json"))}

    assert records(shared) == records(tmp_path / "single")


# --------------------------------------------------------------------------- claims


def test_a_dead_owners_claim_is_broken_and_a_live_one_is_respected(tmp_path):
    from qeval import claims

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / ".claims"
    folder.mkdir()
    import socket

    owner = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": time.time(), "token": "t"}
    (folder / "abc.json").write_text(json.dumps(owner))
    taken = claims.take(tmp_path, "abc", "label")
    assert isinstance(taken, claims.Claim) and taken.owner["pid"] == os.getpid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / "def.json").write_text(json.dumps({**owner, "pid": sleeper.pid}))
        held = claims.take(tmp_path, "def", "label")
        assert isinstance(held, dict) and held["pid"] == sleeper.pid
        assert set(claims.live_claims(tmp_path, {"abc", "def"})) == {"def"}  # its own claim is not "another"
        # another host's claim is live while its heartbeat is fresh, broken once stale
        (folder / "ghi.json").write_text(json.dumps({**owner, "host": "elsewhere", "pid": 1}))
        assert isinstance(claims.take(tmp_path, "ghi", "label"), dict)
        old = time.time() - claims.STALE_S - 1
        os.utime(folder / "ghi.json", (old, old))
        assert isinstance(claims.take(tmp_path, "ghi", "label"), claims.Claim)
    finally:
        sleeper.kill()
    taken.release()
    assert not (folder / "abc.json").exists()


# --------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A real two-cell sweep (fp16, w4g128) on the tiny model."""
    require_eval_data()
    from conftest import run_in_process

    root = tmp_path_factory.mktemp("report")
    proc = run_in_process("qeval", ["-m", *TINY, "quant=fp16,w4g128", f"results_dir={root}", "sweep_name=s"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "s"


def _copy(sweep: Path, dest: Path, keep: str | None = None) -> Path:
    dest.mkdir(parents=True)
    for path in sweep.iterdir():
        if path.is_file() and (keep is None or keep in path.name):
            shutil.copy(path, dest / path.name)
    return dest


def test_a_report_without_baseline_says_so_and_shows_raw_scores(finished_sweep, tmp_path, report_in_process):
    only_quantized = _copy(finished_sweep, tmp_path / "noFP", keep="w4g128")
    proc = report_in_process([str(only_quantized), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Baseline missing: tiny-llama" in proc.stdout and "raw scores only" in proc.stdout
    assert "quality retained per family" not in proc.stdout  # no ratios to a baseline that is not there
    assert "wikitext2.ppl" in proc.stdout  # the raw scores are
    assert "Baseline missing" in (tmp_path / "out" / "summary.md").read_text()


def test_a_record_with_a_non_numeric_metric_is_listed_as_unreadable(finished_sweep, tmp_path, report_in_process):
    sweep = _copy(finished_sweep, tmp_path / "bad")
    path = next(sweep.glob("*w4g128*.json"))
    record = json.loads(path.read_text())
    record["metrics"]["lambada"]["acc"] = "abc"
    path.write_text(json.dumps(record))
    proc = report_in_process([str(sweep), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    not_run = (tmp_path / "out" / "not_run.md").read_text()
    assert "unreadable" in not_run and "lambada.acc is 'abc', not a number" in not_run and path.name in not_run
    assert "unreadable" in (tmp_path / "out" / "report.html").read_text()


def test_a_skipped_only_sweep_says_skipped(finished_sweep, tmp_path, report_in_process):
    sweep = tmp_path / "skipped"
    sweep.mkdir()
    for path in finished_sweep.glob("*.json"):
        record = json.loads(path.read_text())
        record.update(status="skipped", reason="the method cannot make this cell")
        record.pop("items", None)
        (sweep / path.name).write_text(json.dumps(record))
    proc = report_in_process([str(sweep)], tmp_path)
    assert proc.returncode == 2
    assert "2 skipped" in proc.stderr and "the method cannot make this cell" in proc.stderr
    assert "no finished cells" not in proc.stderr
