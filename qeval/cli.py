"""``qeval``: the Hydra application.  One job = one sweep cell.

``qeval`` alone runs the default quick sweep (``qeval/conf/config.yaml`` sets
``hydra.mode=MULTIRUN`` and the default grid of quantization presets);
``qeval -m model=... quant=a,b method=...`` runs any other grid.  The configs
ship inside the package, so an installed wheel works from any directory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from qeval.cell import build_cell, load_method_plugins, preflight, register_configs
from qeval.config import ConfigError
from qeval.errors import ResultsNotWritable
from qeval.sweep import EXIT_FAILED, EXIT_REFUSED, mark_started, planned_in_this_launch, refuse, started

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_configs()
# each launch's own Hydra folder (.hydra/<time>-<pid>): two launches started in the same second
# would otherwise share one, and the second would overwrite the first's plan.  Cached, and Hydra
# copies resolver caches into every job's config, so workers see the launching process's value
OmegaConf.register_new_resolver("qeval_launch", lambda: str(os.getpid()), use_cache=True, replace=True)


def is_multirun() -> bool:
    """Whether this process runs a Hydra multirun (a sweep) rather than one cell (hydra.mode=RUN)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any]:
    # lm-eval warns about things qeval does on purpose (passing an in-memory model, a custom
    # dataset loader); keep its errors, drop the chatter
    for noisy in ("lm_eval", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # the runner imports model loading (transformers' auto classes: seconds); a sweep refused in
    # planning, --help and the tools that only compose configs never need it
    from qeval.runner import run_cell

    single = not is_multirun()
    try:
        cell = build_cell(cfg)
        if single:  # hydra.mode=RUN: no sweep planned this cell; its errors are refusals too (exit 2)
            preflight(cell)
    except ConfigError as err:
        if not single:  # a sweep's cells were checked in its plan; a cluster worker's job fails
            raise
        refuse(str(err))
    if single:
        mark_started()
    try:
        record = run_cell(cell, checked=single or planned_in_this_launch(cell.hash))
    except ResultsNotWritable as err:
        # computing the other cells would lose their records too: stop now, one line
        print(f"qeval: stopping the sweep: {err}; finished cells are kept, run the same command again", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if single and record.get("status") == "failed":
        sys.exit(EXIT_FAILED)
    return record


def compose_config(overrides: list[str]) -> DictConfig:
    """The config one ``qeval`` cell would get for these overrides (for tools beside the sweep:
    qeval-stats, benchmarks, tests), composed without starting a Hydra run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def method_plugins_from_argv(argv: list[str]) -> list[str]:
    """The files or modules named by ``methods.include=[...]`` on the command line: they must be
    imported before Hydra composes, so that ``method=<their step>`` is a typed node."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found: list[str] = []
    for arg in argv:
        if arg.lstrip("+").startswith("methods.include="):
            value = OverridesParser.create().parse_override(arg).value()
            found.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return found


def main() -> None:
    """The console script.  Exit status: 0 every cell finished (ok or skipped), 1 some cell failed
    (or the sweep stopped), 2 refused before any cell started: a config or preflight error,
    Hydra's own included (it exits 1 for those; before the first cell that means "refused")."""
    try:
        plugins = method_plugins_from_argv(sys.argv[1:])
        if plugins:
            load_method_plugins(plugins)
            register_configs()
    except ConfigError as err:
        print(f"qeval: {err}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    try:
        _app()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and not started():
            raise SystemExit(EXIT_REFUSED) from None
        raise


if __name__ == "__main__":
    main()
