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

import logging
import sys
import time
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("qeval")


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


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.statuses: dict[str, int] = {}
        self.not_ok: list[str] = []  # "status: label (reason)" of skipped and failed cells

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qeval.config import ConfigError
        from qeval.runner import preflight

        self.started = time.perf_counter()
        jobs = plan_cells(config)
        for overrides in jobs:
            try:
                preflight(compose_cell(config, overrides))
            except (ConfigError, KeyError, FileNotFoundError, OmegaConfBaseException) as err:
                where = " ".join(overrides) or "(defaults)"
                print(f"qeval: error in cell [{where}]: {err}", file=sys.stderr)
                sys.exit(2)
        self.total = len(jobs)
        log.info("sweep: %d cells planned and validated in %.1fs", self.total, time.perf_counter() - self.started)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.total:
            log.info("sweep: starting cell %d/%d (%s)", self.done + 1, self.total, " ".join(
                config.hydra.overrides.task) or "defaults")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.done += 1
        status = "crashed"
        try:
            record = job_return.return_value
            status = record.get("status", "ok")
            if status in ("skipped", "failed"):
                self.not_ok.append(f"{status}: {record['label']} ({record.get('reason', '')})")
            if record.get("_skipped_existing"):
                status = "already done"
        except Exception:  # noqa: BLE001 - the job itself raised; Hydra reports it
            pass
        self.statuses[status] = self.statuses.get(status, 0) + 1
        elapsed = time.perf_counter() - self.started
        if self.total:
            remaining = elapsed / self.done * (self.total - self.done)
            log.info("sweep: %d/%d cells done, elapsed %s, estimated remaining %s",
                     self.done, self.total, _hms(elapsed), _hms(remaining))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qeval.report.table import write_tables

        sweep_dir = f"{config.results_dir}/{config.sweep_name}"
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        print(f"\nqeval: sweep finished in {_hms(time.perf_counter() - self.started)} ({counts})")
        for line in self.not_ok:
            print(f"  {line}")
        try:
            table, files = write_tables(sweep_dir)
            print(table)
            print(f"\nresults: {sweep_dir}/  tables: {', '.join(map(str, files))}")
        except ValueError as err:
            print(f"qeval: no table ({err})")
        if self.statuses.get("failed") or self.statuses.get("crashed"):
            sys.exit(1)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
