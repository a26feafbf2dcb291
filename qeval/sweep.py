"""Sweep-level behaviour hooked into Hydra's multirun through a callback.

* Before any cell runs, every cell of the sweep is composed (exactly as the
  sweeper will compose it) and validated, so ``qeval quant.w.bits=1`` or an
  unknown preset in the fifth cell fails in seconds, not after four cells.
* While cells run, a sweep-level progress line (cells done / total, elapsed,
  estimated remaining) is printed besides the per-step bars.
* At the end, the sweep's table is printed with the location of the files,
  and the exit status is non-zero if any cell failed.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qeval import claims
from qeval.cell import Cell, build_cell, preflight
from qeval.config import ConfigError, check_sweep_name
from qeval.errors import ResultsNotWritable
from qeval.memory import SweepTooLarge, plan_memory
from qeval.results import ResultStore, read_record, write_json_atomically

log = logging.getLogger(__name__)


def plan_cells(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of the multirun, as BasicSweeper builds them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = []
    sweeper_params = config.hydra.sweeper.get("params") or {}
    for key, value in sweeper_params.items():
        params.append(f"{key}={value}")
    params.extend(config.hydra.overrides.task)
    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return [list(job) for batch in batches for job in batch]


def compose_cell(config: DictConfig, overrides: list[str]) -> DictConfig:
    return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)


PLAN_FILE = "qeval_plan.json"

#: the exit statuses of ``qeval`` (README "Exit status"): every cell finished (ok or skipped), some
#: cell failed or the sweep stopped, refused before any cell started
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

_started = False


def mark_started() -> None:
    """From now on, a non-zero exit means "a cell failed" (1), no longer "refused" (2)."""
    global _started
    _started = True


def started() -> bool:
    """Whether this process got past planning: a cell may have run."""
    return _started


def refuse(message: str) -> NoReturn:
    """Print one line and exit 2: the sweep is refused before any cell starts."""
    print(f"qeval: {message}", file=sys.stderr)
    sys.exit(EXIT_REFUSED)


def check_results_writable(config: DictConfig) -> None:
    """The sweep's results folder can take files: checked once, first, before anything is composed."""
    try:
        check_sweep_name(OmegaConf.select(config, "sweep_name"))
    except ConfigError as err:
        refuse(str(err))
    store = ResultStore(str(config.results_dir), str(config.sweep_name))
    try:
        store.check_writable()
    except ResultsNotWritable as err:
        refuse(f"{err}: choose another with results_dir=<folder>")


#: pip packages of Hydra's launcher plugins, by the module their launcher class lives in
LAUNCHER_PACKAGES = {
    "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
    "hydra_plugins.hydra_ray_launcher": "hydra-ray-launcher",
    "hydra_plugins.hydra_rq_launcher": "hydra-rq-launcher",
}


def check_launcher(config: DictConfig) -> None:
    """The launcher's class can be imported; else name the package to install (Hydra would
    instantiate it only after planning, with "Unknown plugin class")."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    module = target.rpartition(".")[0]
    if not module or module.startswith("hydra._internal"):
        return
    try:
        importlib.import_module(module)
    except ImportError as err:
        choice = (OmegaConf.select(config, "hydra.runtime.choices") or {}).get("hydra/launcher", target)
        package = next((p for m, p in LAUNCHER_PACKAGES.items() if module.startswith(m)), None)
        hint = f"pip install {package}" if package else "install the package that provides it"
        refuse(f"hydra/launcher={choice} needs {target}, which cannot be imported ({err}): {hint}")


#: launchers whose jobs run on the machine that plans the sweep (then it checks their device)
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")


def runs_here(config: DictConfig) -> bool:
    """Whether the sweep's cells run on this machine (basic, joblib, submitit local) rather than on a cluster's
    nodes (SLURM, Ray), which may have GPUs the planning machine lacks."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return not target or any(name in target for name in LOCAL_LAUNCHERS)


def _plan_path(config: DictConfig) -> Path:
    """The plan lives in this launch's Hydra sweep folder, which every launcher's jobs can see."""
    return Path(config.hydra.sweep.dir) / PLAN_FILE


class SweepCallback(Callback):
    """Validates the whole sweep before it starts, reports progress, summarizes at the end.

    Parallel launchers (joblib, submitit, Ray) run ``on_job_*`` in their worker
    processes, not in the process that started the sweep, so nothing here counts
    in memory: the plan (every cell's hash, written before any cell runs) and the
    result files are the shared state, and progress and the final summary are read
    from them whichever process asks.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and goes on; a sweep that cannot
        # be planned must not start, so any error here ends the run
        try:
            self._plan(config)
        except Exception as err:  # noqa: BLE001
            refuse(f"could not plan the sweep: {type(err).__name__}: {err}")
        mark_started()

    def _plan(self, config: DictConfig) -> None:
        started = time.time()
        check_results_writable(config)
        check_launcher(config)
        cells = []
        built: list[Cell] = []
        here = runs_here(config)
        for overrides in plan_cells(config):
            try:
                cell = build_cell(compose_cell(config, overrides))
                preflight(cell, here=here)
            except (ConfigError, KeyError, FileNotFoundError, OmegaConfBaseException) as err:
                refuse(f"error in cell [{' '.join(overrides) or '(defaults)'}]: {err}")
            cells.append({"hash": cell.hash, "label": cell.label, "overrides": list(overrides)})
            built.append(cell)
        try:  # before any cell: a sweep that cannot fit is refused, naming the numbers
            log.info("%s", plan_memory(built, built[0].memory_limit_gib if built else None))
        except SweepTooLarge as err:
            refuse(str(err))
        store = ResultStore(config.results_dir, config.sweep_name)
        for tmp in store.remove_stale_temporaries():
            log.warning("removed %s, left by a writer that was killed mid-write", tmp)
        done_before = sorted({c["hash"] for c in cells if store.finished(c["hash"]) is not None})
        plan = {"started": started, "results": str(store.dir), "cells": cells, "done_before": done_before}
        write_json_atomically(_plan_path(config), plan)
        distinct = len({c["hash"] for c in cells})
        shared = (
            f", {len(cells) - distinct} sharing another cell's result (the FP baseline of each method)"
            if distinct < len(cells)
            else ""
        )
        log.info(
            "sweep: %d cells planned and validated in %.1fs (%d already finished%s)",
            len(cells),
            time.time() - started,
            len(done_before),
            shared,
        )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.info(
            "sweep: starting cell %s (%s)",
            config.hydra.job.get("num", "?"),
            " ".join(config.hydra.overrides.task) or "defaults",
        )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        plan = _read_plan(config)
        if plan is None:
            return
        total = len({c["hash"] for c in plan["cells"]})
        done = len(_result_files(plan))
        computed = done - len(plan["done_before"])
        elapsed = time.time() - plan["started"]
        remaining = elapsed / computed * (total - done) if computed > 0 else float("nan")
        log.info(
            "sweep: %d/%d cells done, elapsed %s, estimated remaining %s", done, total, _hms(elapsed), _hms(remaining)
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # the report stack (pandas, matplotlib) imports in seconds; only the end of a sweep needs it
        from qeval.report.write import write_tables

        plan = _read_plan(config)
        if plan is None:
            print(f"qeval: the sweep plan {_plan_path(config)} is missing or unreadable", file=sys.stderr)
            sys.exit(EXIT_FAILED)
        _wait_for_claimed(plan)
        records = _records(plan)
        counts: dict[str, int] = {}
        for cell_hash, record in records.items():
            status = record.get("status", "missing")
            if status == "ok" and cell_hash in plan["done_before"]:
                status = "already done"
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"\nqeval: sweep finished in {_hms(time.time() - plan['started'])} ({summary})")
        for line in _not_ok_lines(plan, records):
            print(f"  {line}")
        if not counts.get("ok") and not counts.get("already done"):
            print(f"qeval: no table: no cell produced scores ({summary}; the reasons are above)")
        else:
            try:
                table, files = write_tables(plan["results"])
                print(table)
                print(f"\nresults: {plan['results']}/  tables: {', '.join(map(str, files))}")
            except ValueError as err:
                print(f"qeval: no table ({err})")
        if counts.get("failed") or counts.get("missing"):
            sys.exit(EXIT_FAILED)


#: how often the end of a sweep looks for the results of cells other processes are computing
CLAIM_POLL_S = 2.0


def _wait_for_claimed(plan: dict[str, Any]) -> None:
    """Wait until no planned cell without a result is held by another live process (a second
    launch into the same sweep folder, or a sibling worker): their records are this sweep's too.
    A holder that dies without a result leaves the cell "missing" (run the sweep again)."""
    store_dir = Path(plan["results"])
    last_said = 0.0
    while True:
        pending = {c["hash"] for c in plan["cells"]} - set(_result_files(plan))
        held = claims.live_claims(store_dir, pending)
        if not held:
            return
        if time.time() - last_said > 60:
            owners = sorted({claims.describe(o) for o in held.values()})
            log.info("sweep: waiting for %d cell(s) computed by another process (%s)", len(held), "; ".join(owners))
            last_said = time.time()
        time.sleep(CLAIM_POLL_S)


def _read_plan(config: DictConfig) -> dict[str, Any] | None:
    try:
        return json.loads(_plan_path(config).read_text())
    except (OSError, ValueError):
        return None


def _result_files(plan: dict[str, Any]) -> dict[str, Path]:
    """Planned cell hash -> its result file, for the files that count for this launch: those
    finished before it, and those written since it started (an older failed one is being
    retried, so it does not count yet)."""

    store_dir = Path(plan["results"])
    planned = {c["hash"] for c in plan["cells"]}
    found = {}
    for cell_hash, path in ResultStore(store_dir.parent, store_dir.name).paths_by_hash().items():
        if cell_hash not in planned:  # another launch's cells in the same sweep folder
            continue
        try:
            if cell_hash in plan["done_before"] or path.stat().st_mtime >= plan["started"] - 1:
                found[cell_hash] = path
        except FileNotFoundError:
            pass
    return found


def _records(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per planned cell (hash), its record, or {} when it has no readable result: not run yet,
    or its worker died before recording it (status "missing")."""

    records: dict[str, dict[str, Any]] = {c["hash"]: {} for c in plan["cells"]}
    for cell_hash, path in _result_files(plan).items():
        records[cell_hash] = read_record(path) or {}
    return records


def _not_ok_lines(plan: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for cell in {c["hash"]: c for c in plan["cells"]}.values():
        record = records[cell["hash"]]
        status = record.get("status", "missing")
        if status in ("skipped", "failed"):
            lines.append(f"{status}: {cell['label']} ({record.get('reason', '')})")
        elif status == "missing":
            lines.append(
                f"missing: {cell['label']} (no result: its job crashed or was killed; "
                f"overrides {' '.join(cell['overrides']) or '(defaults)'})"
            )
    return lines


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def planned_in_this_launch(hash_: str) -> bool:
    """Whether the running job's cell was composed and preflighted by this launch's planner
    (then the job does not repeat the preflight)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        plan = json.loads((Path(HydraConfig.get().sweep.dir) / PLAN_FILE).read_text())
    except (OSError, ValueError, AttributeError):
        return False
    return any(c.get("hash") == hash_ for c in plan.get("cells", []))
