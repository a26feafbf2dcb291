"""``qeval``: the Hydra application.  One job = one sweep cell.

``qeval`` alone runs the default quick sweep (``qeval/conf/config.yaml`` sets
``hydra.mode=MULTIRUN`` and the default grid of quantization presets);
``qeval -m model=... quant=a,b method=...`` runs any other grid.  The configs
ship inside the package, so an installed wheel works from any directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from qeval.cell import build_cell, load_method_plugins, register_configs
from qeval.sweep import planned_in_this_launch

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_configs()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any]:
    # lm-eval warns about things qeval does on purpose (passing an in-memory model, a custom
    # dataset loader); keep its errors, drop the chatter
    for noisy in ("lm_eval", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # the runner imports model loading (transformers' auto classes: seconds); a sweep refused in
    # planning, --help and the tools that only compose configs never need it
    from qeval.runner import run_cell

    cell = build_cell(cfg)
    return run_cell(cell, checked=planned_in_this_launch(cell.hash))


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
    plugins = method_plugins_from_argv(sys.argv[1:])
    if plugins:
        load_method_plugins(plugins)
        register_configs()
    _app()


if __name__ == "__main__":
    main()
