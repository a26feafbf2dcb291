"""Run one sweep cell: check, load, quantize, evaluate, record.

Everything that can be checked without a model is checked first (config
ranges, method support, data availability, task names), so bad input fails
in seconds.  A cell that the method cannot produce is recorded as skipped; a
cell that crashes is recorded as failed with its error and the sweep goes on.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import random
import socket
import time
import traceback
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qeval.config import BACKEND_IDENTITY_KEYS, ConfigError, bits_label, quantized, tensor_type, to_container, validate
from qeval.results import SCHEMA_VERSION, ResultStore, package_versions, qeval_version, stable_hash

log = logging.getLogger("qeval")


def uses_calibration(cfg: DictConfig) -> bool:
    from qeval.quant.methods import METHODS

    method_cls = METHODS[cfg.method.name]
    static_acts = quantized(cfg.quant.a) and not cfg.quant.a.dynamic
    return bool(method_cls.needs_calibration or static_acts)


def needs_kv_scales(cfg: DictConfig) -> bool:
    """An FP8 KV-cache export calibrates static per-layer scales."""
    return cfg.backend.name == "vllm" and quantized(cfg.quant.kv)


def cell_identity(cfg: DictConfig) -> dict[str, Any]:
    """The parts of a config that determine a cell's numbers."""
    c = to_container(cfg)
    identity = {k: c[k] for k in ("model", "quant", "method", "suite", "backend", "seed")}
    identity["backend"] = {k: v for k, v in identity["backend"].items() if k in BACKEND_IDENTITY_KEYS[cfg.backend.name]}
    if tensor_type(cfg.quant) == "FP":
        # no method touches an unquantized model: quant=fp16 x method=rtn,gptq,awq is one
        # baseline cell, computed once per sweep and found by every method's normalization
        identity["method"] = None
        return identity
    if uses_calibration(cfg) or needs_kv_scales(cfg):
        identity["calib"] = c["calib"]
    return identity


def cell_label(cfg: DictConfig) -> str:
    return f"{cfg.model.name}__{cfg.quant.name}__{cfg.method.name}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def preflight(cfg: DictConfig) -> None:
    """Checks that need no model: config ranges, method parameters, data, task names."""
    validate(cfg)
    from qeval.quant.methods import get_method

    try:
        get_method(cfg.method.name, OmegaConf.to_container(cfg.method.params))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid method.params for method {cfg.method.name!r}: {err}") from err
    from qeval.data import check_available
    from qeval.eval.suite import check_suite

    check_suite(cfg)
    if cfg.backend.name == "vllm":
        from qeval.backends.vllm import INSTALL_HINT, vllm_installed
        from qeval.eval.suite import native_entries

        if not vllm_installed():
            raise ConfigError(f"backend=vllm: vLLM is not installed; {INSTALL_HINT}")
        if native := native_entries(cfg):
            raise ConfigError(
                f"backend=vllm scores perplexity and lm-eval tasks; suite {cfg.suite.name!r} has "
                f"qeval-native tasks ({', '.join(native)}) that need backend=hf: drop them with "
                f"'~suite.tasks.<name>' or use suite=kernels"
            )
    if uses_calibration(cfg) or needs_kv_scales(cfg):
        check_available(cfg.calib.dataset, cfg.data_dir)


def _export_dir(cfg: DictConfig, cell_hash: str):
    from pathlib import Path

    from qeval.models.carriers import cache_root

    root = (
        Path(cfg.backend.export_dir).expanduser() if cfg.backend.export_dir else cache_root(cfg.cache_dir) / "exports"
    )
    return root / f"{cell_label(cfg)}-{cell_hash[:12]}"


def quantized_cache_dir(cfg: DictConfig, model_fingerprint: str):
    """The cache entry of this cell's quantized model: everything that decides its weights
    (qeval's version included: a new release may quantize differently)."""
    from qeval.models.carriers import cache_root
    from qeval.quant.cache import CACHE_FORMAT

    c = to_container(cfg)
    key = {
        "model": model_fingerprint,
        "quant": c["quant"],
        "method": c["method"],
        "seed": cfg.seed,
        "format": CACHE_FORMAT,
        "calib": c["calib"] if uses_calibration(cfg) else None,
        "device": cfg.backend.device,
        "qeval": qeval_version(),
    }
    return cache_root(cfg.cache_dir) / "quantized" / f"{cell_label(cfg)}-{stable_hash(key)}"


def _quantized_model(cfg: DictConfig, loaded: Any, method: Any, calibration: Any) -> tuple[torch.nn.Module, str]:
    """The cell's quantized model, from the quantized-model cache when enabled and present;
    (model, "hit" / "miss" / "off")."""
    from qeval.quant.apply import quantize_model
    from qeval.quant.cache import load_quantized, save_quantized

    model = loaded.fresh_copy().to(cfg.backend.device)
    if not (cfg.quantized_cache and quantized(cfg.quant.w)):
        return quantize_model(model, cfg.quant, method, calibration), "off"
    entry = quantized_cache_dir(cfg, loaded.fingerprint)
    if load_quantized(model, entry, cfg.quant):
        log.info("quantized model read from %s", entry)
        return model, "hit"
    if entry.exists():  # an entry that failed to load may have half-rebuilt the copy
        model = loaded.fresh_copy().to(cfg.backend.device)
    quantize_model(model, cfg.quant, method, calibration)
    save_quantized(model, entry, provenance={"cell": cell_label(cfg), "method": cfg.method.name})
    log.info("quantized model kept in %s", entry)
    return model, "miss"


def _task_checkpoints(store: ResultStore, cell_hash: str, fingerprint: str) -> dict[str, Any]:
    """evaluate_suite arguments that keep each finished task of the cell on disk until the cell
    is recorded, and reuse those an interrupted run of the same cell left behind."""
    kept = store.partial(cell_hash, fingerprint)
    if kept:
        log.info("reusing %d task score(s) of an interrupted run: %s", len(kept), ", ".join(kept))

    def on_task_done(name: str, metrics: dict[str, Any], seconds: float) -> None:
        kept[name] = {"metrics": metrics, "seconds": seconds}
        store.save_partial(cell_hash, fingerprint, kept)

    return {"finished": dict(kept), "on_task_done": on_task_done}


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run (or skip, if already finished) one cell and return its record."""
    t_start = time.perf_counter()
    preflight(cfg)
    if cfg.data_dir:
        os.environ["QEVAL_DATA_DIR"] = str(cfg.data_dir)
    store = ResultStore(cfg.results_dir, cfg.sweep_name)
    identity = cell_identity(cfg)
    cell_hash = stable_hash(identity)
    label = cell_label(cfg)
    if not cfg.rerun and (done := store.finished(cell_hash)) is not None:
        log.info("cell %s already finished (%s): skipping", label, store.find(cell_hash))
        store.drop_partial(cell_hash)  # left if a kill fell between recording the cell and dropping it
        return done

    from qeval.eval.suite import describe_suite
    from qeval.quant.methods import UnsupportedCellError, get_method

    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "hash": cell_hash,
        "label": label,
        "sweep": cfg.sweep_name,
        "cell": {
            "model": cfg.model.name,
            "quant": cfg.quant.name,
            "method": cfg.method.name,
            "suite": cfg.suite.name,
            "backend": cfg.backend.name,
            "tensor_type": tensor_type(cfg.quant),
            "bits": bits_label(cfg.quant),
        },
        "config": to_container(cfg),
        "identity": identity,
        "seed": cfg.seed,
        "versions": package_versions(),
        "timings": {},
        "metrics": {},
        "host": {"hostname": socket.gethostname(), "pid": os.getpid()},
        "started_at": time.time(),
        "tasks": describe_suite(cfg),
    }
    method = get_method(cfg.method.name, OmegaConf.to_container(cfg.method.params))
    try:
        method.check_supported(tensor_type(cfg.quant))
        if cfg.backend.name == "vllm":
            from qeval.backends.vllm import check_kernels, device_type
            from qeval.export.compressed_tensors import export_scheme

            check_kernels(export_scheme(cfg.quant), device_type())
    except UnsupportedCellError as err:
        record.update(status="skipped", reason=str(err))
        store.write(record)
        log.warning("cell %s skipped: %s", label, err)
        return record

    model = None
    try:
        _seed_everything(cfg.seed)
        if cfg.backend.threads:
            torch.set_num_threads(cfg.backend.threads)
        from qeval.models.loading import load_model

        t0 = time.perf_counter()
        loaded = load_model(cfg.model, cfg.cache_dir)  # once per process; later cells reuse it
        record["model_fingerprint"] = loaded.fingerprint
        record["timings"]["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from qeval.data import calibration_for

        # tokenized at most once per cell, whether the method, static scales or the KV export ask
        calibration = functools.cache(functools.partial(calibration_for, cfg, loaded.tokenizer))
        model, record["quantized_cache"] = _quantized_model(cfg, loaded, method, calibration)
        record["timings"]["quantize"] = time.perf_counter() - t0
        log.info(
            "cell %s: quantized in %.1fs%s",
            label,
            record["timings"]["quantize"],
            " (from the quantized-model cache)" if record["quantized_cache"] == "hit" else "",
        )
        from qeval.eval.suite import evaluate_suite

        if cfg.backend.name == "vllm":
            from qeval.backends.vllm import VllmEngine, settings_from_config
            from qeval.export.compressed_tensors import export_checkpoint, export_scheme

            t0 = time.perf_counter()
            checkpoint = export_checkpoint(
                model,
                loaded.tokenizer,
                cfg.quant,
                _export_dir(cfg, cell_hash),
                kv_calibration=calibration() if needs_kv_scales(cfg) else None,
                provenance={"cell": label, "hash": cell_hash, "method": cfg.method.name},
            )
            record["export"] = str(checkpoint)
            record["timings"]["export"] = time.perf_counter() - t0
            model = None
            gc.collect()
            with VllmEngine(checkpoint, settings_from_config(cfg, export_scheme(cfg.quant))) as engine:
                record["engine"] = {"device": engine.device, **engine.kwargs}
                record["metrics"], record["timings"]["eval"] = evaluate_suite(
                    engine, loaded.tokenizer, cfg, **_task_checkpoints(store, cell_hash, loaded.fingerprint)
                )
        else:
            if cfg.backend.device_map:
                from qeval.models.loading import spread_over_devices

                record["device_map"] = spread_over_devices(model, cfg.backend.device_map)
            record["metrics"], record["timings"]["eval"] = evaluate_suite(
                model,
                loaded.tokenizer,
                cfg,
                reference=loaded.model,
                reference_fingerprint=loaded.fingerprint,
                **_task_checkpoints(store, cell_hash, loaded.fingerprint),
            )
        record["status"] = "ok"
    except UnsupportedCellError as err:
        record.update(status="skipped", reason=str(err))
        log.warning("cell %s skipped: %s", label, err)
    except Exception as err:  # noqa: BLE001 - a failed cell is recorded, the sweep goes on
        record.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("cell %s failed: %s", label, record["reason"])
    finally:
        del model
        gc.collect()
    record["timings"]["total"] = time.perf_counter() - t_start
    record["finished_at"] = time.time()
    path = store.write(record)
    log.info("cell %s: %s -> %s", label, record["status"], path)
    return record
