"""``qeval``: the Hydra application.  One job = one sweep cell.

``qeval`` alone runs the default quick sweep (conf/config.yaml sets
``hydra.mode=MULTIRUN`` and the default grid of quantization presets);
``qeval -m model=... quant=a,b method=...`` runs any other grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from qeval.config import register_configs

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_configs()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any]:
    from qeval.runner import run_cell

    # lm-eval warns about things qeval does on purpose (passing an in-memory model, a custom
    # dataset loader); keep its errors, drop the chatter
    for noisy in ("lm_eval", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return run_cell(cfg)


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


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
