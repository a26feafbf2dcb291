"""The Ray and SLURM launchers against real clusters started on this machine.

For each cluster asked for (default: both), the script starts it on the loopback interface,
runs the 4-cell tiny sweep of ``tests/test_launchers.py`` through qeval's launcher config
(``hydra/launcher=ray`` or ``slurm``), stops the cluster, and compares the records with the
basic (sequential) launcher's run of the same cells: same cell hashes, all ``ok``, identical
``metrics`` dicts, and every cell run in a process other than the launching one and the basic
run's.

* Ray: ``ray start --head --node-ip-address=127.0.0.1 --port=<free> --num-cpus=2`` (pip install
  '.[ray]'); the launcher joins it with ``hydra.launcher.ray.init.address=127.0.0.1:<port>``, one
  CPU and no GPU per cell. ``ray stop`` at the end.
* SLURM: a single-node cluster from Debian's ``slurm-wlm`` (slurmctld + slurmd on localhost,
  ``auth/none``, no accounting: submitit then follows the jobs through their result files and logs
  "Bypassing sacct error"), written into a temporary folder with its own ports; needs root. One
  CPU, 4 GB and no GPU per cell, partition ``debug``.

    python benchmarks/cluster_launchers.py            # both
    python benchmarks/cluster_launchers.py --ray      # or --slurm

The exit status is 1 on any mismatch or failed run, 2 when a cluster asked for cannot start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# as tests/test_launchers.py: one thread everywhere, or the thread count moves the last bits of
# some metrics on this CPU and the exact comparison would read it as a launcher difference
CELLS = ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128,w8a8,kv4", "sweep_name=launch", "backend.threads=1"]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "QEVAL_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class ClusterUnavailable(RuntimeError):
    """The cluster software is missing or would not start (the caller skips, saying why)."""


def sweep_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the sweep and of the cluster daemons (Ray workers and SLURM jobs inherit
    it: offline, the data folder, this checkout first on the path)."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.setdefault("QEVAL_DATA_DIR", str(REPO.parent / "shared" / "data"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(args: list[str], results_dir: Path, env: dict[str, str], timeout: float = 1200) -> dict:
    """One ``qeval -m`` run of CELLS + args into results_dir: its output, exit status, wall seconds
    and the pid of the launching process."""
    results_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qeval.cli", "-m", *CELLS, *args, f"results_dir={results_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=results_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\n[timed out after {timeout:.0f} s]"
    (results_dir / "sweep.log").write_text(out)
    return {
        "returncode": proc.returncode,
        "output": out,
        "wall_s": time.perf_counter() - start,
        "pid": proc.pid,
        "results_dir": results_dir,
    }


def records(results_dir: Path) -> dict[str, dict]:
    return {r["hash"]: r for r in (json.loads(p.read_text()) for p in (results_dir / "launch").glob("*.json"))}


def compare(basic: dict, run: dict) -> dict:
    """The launcher's records against the basic launcher's; ``problems`` is empty when they agree."""
    base, got = records(basic["results_dir"]), records(run["results_dir"])
    pids = {r["host"]["pid"] for r in got.values()}
    base_pids = {r["host"]["pid"] for r in base.values()} | {basic["pid"]}
    ok = sum(r["status"] == "ok" for r in got.values())
    same = sum(h in base and r["metrics"] == base[h]["metrics"] for h, r in got.items())
    problems = []
    if run["returncode"] != 0:
        problems.append(f"exit status {run['returncode']}:\n{run['output'][-3000:]}")
    if len(base) != 4 or any(r["status"] != "ok" for r in base.values()):
        problems.append(f"basic run: {len(base)} records, statuses {sorted(r['status'] for r in base.values())}")
    if got.keys() != base.keys():
        problems.append(
            f"hashes differ: only launcher {sorted(got.keys() - base.keys())}, "
            f"only basic {sorted(base.keys() - got.keys())}"
        )
    if ok != len(got):
        problems.append(f"statuses {sorted(r['status'] for r in got.values())}")
    if same != len(base):
        problems.append(f"{len(base) - same} of {len(base)} cells with other metrics than the basic run")
    if pids & (base_pids | {run["pid"]}):
        problems.append(f"cells ran in the launching or the basic run's process (pids {sorted(pids)})")
    for needle in ("4 cells planned and validated", "(4 ok)"):
        if needle not in run["output"]:
            problems.append(f"{needle!r} not in the sweep's output")
    return {"cells": len(got), "ok": ok, "identical": same, "processes": len(pids), "problems": problems}


def _wait(predicate, timeout: float, what: str, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise ClusterUnavailable(f"{what} not within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_cluster(workdir: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """A head node on 127.0.0.1 with 2 CPUs; yields the launcher overrides that use it."""
    ray = shutil.which("ray", path=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    try:
        import hydra_plugins.hydra_ray_launcher  # noqa: F401
    except ImportError as e:
        raise ClusterUnavailable(f"hydra-ray-launcher is not installed (pip install '.[ray]'): {e}") from None
    if ray is None:
        raise ClusterUnavailable("the `ray` command is not installed (pip install '.[ray]')")
    port = free_port()
    # a short folder: Ray's sockets live under it and a Unix socket path has at most 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="qray", dir="/tmp"))
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    try:
        proc = subprocess.run(start, env=env, cwd=workdir, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"ray start failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        yield [
            "hydra/launcher=ray",
            f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
            "hydra.launcher.ray.remote.num_gpus=0",
            "hydra.launcher.ray.remote.num_cpus=1",
        ]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


# -------------------------------------------------------------------------------------- SLURM

SLURM_CONF = """\
ClusterName=qeval
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ClusterUnavailable("no MemTotal in /proc/meminfo")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def slurm_cluster(workdir: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """slurmctld + slurmd for one node (this machine, as ``localhost``) from a slurm.conf in a
    temporary folder; sets SLURM_CONF in env (the sweep's sbatch/sacct read it) and yields the
    launcher overrides."""
    missing = [c for c in ("slurmctld", "slurmd", "sinfo", "sbatch", "scancel") if shutil.which(c) is None]
    if missing:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd must run as root")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError as e:
        raise ClusterUnavailable(f"hydra-submitit-launcher is not installed: {e}") from None
    conf_dir = Path(tempfile.mkdtemp(prefix="qslurm", dir="/tmp"))
    for sub in ("state", "spool"):
        (conf_dir / sub).mkdir()
    cpus = min(os.cpu_count() or 1, 2)
    conf = conf_dir / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            dir=conf_dir, ctld_port=free_port(), d_port=free_port(), cpus=cpus, mem_mb=_total_memory_mb() - 1024
        )
    )
    env["SLURM_CONF"] = str(conf)
    daemons: list[subprocess.Popen] = []
    log = open(conf_dir / "daemons.out", "w")  # noqa: SIM115 (closed in finally)

    def sinfo(*fmt: str) -> str:
        return subprocess.run(["sinfo", "-h", *fmt], env=env, capture_output=True, text=True, timeout=30).stdout

    def daemon_log() -> str:
        text = "".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}"
            for p in sorted(conf_dir.glob("*.log")) + [conf_dir / "daemons.out"]
        )
        return text

    try:
        for cmd in (["slurmctld", "-D", "-c", "-f", str(conf)], ["slurmd", "-D", "-N", "localhost", "-f", str(conf)]):
            daemons.append(subprocess.Popen(cmd, env=env, cwd=conf_dir, stdout=log, stderr=log, start_new_session=True))
            time.sleep(1)
            if daemons[-1].poll() is not None:
                raise ClusterUnavailable(f"{cmd[0]} exited with {daemons[-1].returncode}:\n{daemon_log()}")
        try:
            _wait(lambda: sinfo("-o", "%t").strip() == "idle", 60, "the node idle in sinfo")
        except ClusterUnavailable as e:
            raise ClusterUnavailable(f"{e}: sinfo says {sinfo()!r}\n{daemon_log()}") from None
        yield [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.gpus_per_node=null",  # no GRES on this node
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4",
            "hydra.launcher.timeout_min=60",
        ]
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env=env, capture_output=True, timeout=30)
            _wait(
                lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip(),
                30,
                "the queue empty",
            )
        for proc in reversed(daemons):
            _stop(proc)
        log.close()
        shutil.rmtree(conf_dir, ignore_errors=True)


CLUSTERS = {"ray": ray_cluster, "slurm": slurm_cluster}


def run_on_cluster(name: str, workdir: Path, basic: dict) -> dict:
    """Start cluster `name`, run the sweep on it, stop it; the comparison with the basic run."""
    env = sweep_env()
    with CLUSTERS[name](workdir, env) as overrides:
        run = run_sweep(overrides, workdir / name, env)
    return {"launcher": name, "wall_s": run["wall_s"], **compare(basic, run)}


def run_basic(workdir: Path) -> dict:
    run = run_sweep([], workdir / "basic", sweep_env())
    if run["returncode"] != 0:
        raise RuntimeError(f"the basic launcher's sweep failed ({run['returncode']}):\n{run['output'][-3000:]}")
    return run


def table(rows: list[dict]) -> str:
    lines = ["| launcher | cells | ok | identical metrics | processes | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['launcher']} | {r['cells']} | {r['ok']} | {r['identical']}/{r['cells']} | "
            f"{r['processes']} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray", action="store_true", help="the Ray launcher (default: both)")
    parser.add_argument("--slurm", action="store_true", help="the SLURM launcher (default: both)")
    parser.add_argument("--workdir", type=Path, help="keep the results here (default: a temporary folder)")
    args = parser.parse_args(argv)
    names = [n for n in CLUSTERS if getattr(args, n)] or list(CLUSTERS)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qeval-clusters-")))
        basic = run_basic(workdir)
        base = records(workdir / "basic").values()
        rows = [{"launcher": "basic", "cells": len(base), "ok": sum(r["status"] == "ok" for r in base),
                 "identical": len(base), "processes": len({r["host"]["pid"] for r in base}),
                 "wall_s": basic["wall_s"], "problems": []}]  # fmt: skip
        status = 0
        for name in names:
            try:
                rows.append(run_on_cluster(name, workdir, basic))
            except ClusterUnavailable as e:
                print(f"{name}: the cluster did not start: {e}", file=sys.stderr)
                status = max(status, 2)
        print(table(rows))
        for row in rows:
            for problem in row["problems"]:
                print(f"{row['launcher']}: {problem}", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
