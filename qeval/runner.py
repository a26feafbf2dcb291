"""Run one sweep cell: check, load, quantize, evaluate, record.

Everything that can be checked without a model is checked first (config
ranges, recipe, backend support, data availability, task names), so bad input
fails in seconds.  A cell that the recipe or the backend cannot produce is
recorded as skipped; a cell that crashes is recorded as failed with its error
and the sweep goes on.  Below this module there is only the typed
:class:`qeval.cell.Cell`; which backend runs the model is the backend object's
business (``qeval.backends``), never a branch here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from qeval import claims
from qeval.backends import OpenRequest
from qeval.cell import Cell, build_cell, check_model_limits, preflight
from qeval.config import quantized
from qeval.data import calibration_for
from qeval.errors import UnsupportedCellError
from qeval.eval.suite import EvalSettings, describe_suite, evaluate_suite, prepare_references
from qeval.models.carriers import cache_root
from qeval.models.checks import limits_of
from qeval.models.loading import LoadedModel, load_model, peek_config
from qeval.placement import (
    Placement,
    decoder_blocks,
    free_bytes,
    gpu_peak_gib,
    placed_as,
    plan_placement,
    release_device_memory,
    resolve_device,
    streamed,
    tensor_bytes,
    watch_gpu_memory,
)
from qeval.quant import coverage
from qeval.quant.apply import quantize_model, refuse_for_architecture
from qeval.quant.cache import CACHE_FORMAT, load_quantized, save_quantized
from qeval.quant.kv import KV_LAYERS_ATTR, cache_contents
from qeval.quant.linear import drop_codes
from qeval.results import SCHEMA_VERSION, ResultStore, package_versions, qeval_version, stable_hash

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def quantized_cache_dir(cell: Cell, model_fingerprint: str) -> Path:
    """The cache entry of this cell's quantized model: everything that decides its weights
    (qeval's version included: a new release may quantize differently)."""
    key = {
        "model": model_fingerprint,
        "quant": dataclasses.asdict(cell.quant),
        "method": cell.recipe.identity(),
        "seed": cell.seed,
        "format": CACHE_FORMAT,
        "calib": dataclasses.asdict(cell.calib) if cell.uses_calibration else None,
        "device": cell.backend.device,
        "qeval": qeval_version(),
    }
    return cache_root(cell.cache_dir) / "quantized" / f"{cell.label}-{stable_hash(key)}"


def _quantized_model(
    cell: Cell, loaded: LoadedModel, calibration: functools.partial[list[torch.Tensor]]
) -> tuple[torch.nn.Module, str, Placement]:
    """The cell's quantized model, from the quantized-model cache when enabled and present;
    (model, "hit" / "miss" / "off", where it is placed).  A model resident on the compute
    device is moved there first; an offloaded one stays in CPU memory and calibration streams
    its blocks through the compute device (qeval.placement).

    The cell's own copy is the only model in memory: before it is quantized in place, what the
    suite compares the quantized model with is computed on it (while it is still the FP model)
    and cached, so evaluation needs no second, unquantized model."""
    model = loaded.fresh_copy()  # in CPU memory, where it was loaded
    placement = placement_for(cell, model)
    if placement.resident:
        model.to(placement.compute)
    else:
        log.warning(
            "cell %s: weights stay in CPU memory, one block at a time on %s: %s",
            cell.label,
            placement.compute,
            placement.reason,
        )
    with placed_as(placement):
        if cell.quant.tensor_type != "FP":
            with streamed(model, placement):
                settings = eval_settings(cell, placement)
                prepare_references(model, loaded.tokenizer, cell.suite, settings, loaded.fingerprint)
        needs_codes = cell.runtime.needs_codes  # an exporting backend reads the integer codes
        if not (cell.quantized_cache and quantized(cell.quant.w)):
            quantize_model(model, cell.quant, cell.recipe, calibration, keep_codes=needs_codes)
            return model, "off", placement
        entry = quantized_cache_dir(cell, loaded.fingerprint)
        if load_quantized(model, entry, cell.quant):
            log.info("quantized model read from %s", entry)
            if not needs_codes:
                drop_codes(model)
            return model, "hit", placement
        if entry.exists():  # an entry that failed to load may have half-rebuilt the copy
            del model  # freed before the new copy loads: never two copies
            release_device_memory()
            model = loaded.fresh_copy()
            if placement.resident:
                model.to(placement.compute)
        quantize_model(model, cell.quant, cell.recipe, calibration)  # with codes: the cache keeps them
        save_quantized(model, entry, provenance={"cell": cell.label, "method": cell.recipe.name})
        log.info("quantized model kept in %s", entry)
        if not needs_codes:
            drop_codes(model)
        return model, "miss", placement


def _task_checkpoints(store: ResultStore, hash_: str, fingerprint: str) -> dict[str, Any]:
    """evaluate_suite arguments that keep each finished task of the cell on disk until the cell
    is recorded, and reuse those an interrupted run of the same cell left behind."""
    kept = store.partial(hash_, fingerprint)
    if kept:
        log.info("reusing %d task score(s) of an interrupted run: %s", len(kept), ", ".join(kept))

    def on_task_done(name: str, metrics: dict[str, Any], seconds: float, items: Any) -> None:
        kept[name] = {"metrics": metrics, "seconds": seconds, "items": items}
        store.save_partial(hash_, fingerprint, kept)

    return {"finished": dict(kept), "on_task_done": on_task_done}


def placement_for(cell: Cell, model: torch.nn.Module) -> Placement:
    """Where this cell's model computes and rests (qeval.placement.plan_placement), from the
    loaded copy's sizes: all its weights, its largest decoder block, and the calibration
    activations of one block (inputs and outputs of every window, float32)."""
    compute = resolve_device(cell.backend.device)
    if compute.type == "cpu":
        return Placement(compute, compute, compute)
    blocks = decoder_blocks(model)
    weights = tensor_bytes(model)
    block = max((tensor_bytes(b) for b in blocks), default=weights)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    activations = 2 * cell.calib.nsamples * cell.calib.seqlen * hidden * 4 if cell.uses_calibration else 0
    return plan_placement(compute, weights, block, activations, free_bytes(compute), cell.backend.offload)


def eval_settings(cell: Cell, placement: Placement | None = None) -> EvalSettings:
    """What evaluation needs of the cell, and nothing about how it was quantized except the one
    consequence a scorer cannot know: a cache that quantizes only stored tokens is read only
    decode-style (16 tokens per forward unless an entry says otherwise)."""
    kv = cell.quant.kv
    return EvalSettings(
        seed=cell.seed,
        data_dir=cell.data_dir,
        include=cell.include,
        reference_dir=Path(cell.results_dir) / ".reference",
        is_reference=cell.quant.tensor_type == "FP",
        decode_chunk=16 if quantized(kv) and kv.semantics == "cache" else None,
        device=placement.compute.type if placement is not None else "cpu",
    )


def run_cell(cfg: DictConfig | Cell, checked: bool = False) -> dict[str, Any]:
    """Run (or skip, if already finished) one cell and return its record.

    ``checked``: the sweep already ran :func:`qeval.cell.preflight` on this cell (before any
    cell started), so it is not repeated here.
    """
    t_start = time.perf_counter()
    cell = cfg if isinstance(cfg, Cell) else build_cell(cfg)  # a Cell was validated when built
    if not checked:
        preflight(cell)
    store = ResultStore(cell.results_dir, cell.sweep_name)
    identity = cell.identity()
    hash_ = stable_hash(identity)
    label = cell.label
    if not cell.rerun and (done := store.finished(hash_)) is not None:
        log.info("cell %s already finished (%s): skipping", label, store.find(hash_))
        store.drop_partial(hash_)  # left if a kill fell between recording the cell and dropping it
        return done
    store.check_writable()  # ResultsNotWritable: the sweep stops here, before any work
    claim = claims.take(store.dir, hash_, label)
    if not isinstance(claim, claims.Claim):
        log.warning("cell %s is being computed by %s: left to it", label, claims.describe(claim))
        return {"status": "claimed", "hash": hash_, "label": label, "owner": claim}
    try:
        if not cell.rerun and (done := store.finished(hash_)) is not None:  # its owner finished it meanwhile
            return done
        return _compute(cell, store, identity, hash_, t_start)
    finally:
        claim.release()


def _compute(cell: Cell, store: ResultStore, identity: dict[str, Any], hash_: str, t_start: float) -> dict[str, Any]:
    """Compute a claimed cell and record it (skipped, failed or ok)."""
    label = cell.label
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "hash": hash_,
        "label": label,
        "sweep": cell.sweep_name,
        "cell": {
            "model": cell.model.name,
            "quant": cell.quant.name,
            "method": cell.recipe.name,
            "suite": cell.suite.name,
            "backend": cell.backend.name,
            "tensor_type": cell.quant.tensor_type,
            "bits": cell.quant.label,
        },
        "config": cell.to_dict(),
        "identity": identity,
        "seed": cell.seed,
        "versions": package_versions(),
        "timings": {},
        "metrics": {},
        "host": {"hostname": socket.gethostname(), "pid": os.getpid()},
        "started_at": time.time(),
        "tasks": describe_suite(cell.suite, cell.include),
    }
    backend = cell.runtime
    try:
        cell.recipe.check_supported(cell.quant.tensor_type)
        backend.check_supported(cell.quant)
        # what the model's config already rules out is skipped before any weight loads
        if (config := peek_config(cell.model, cell.cache_dir)) is not None:
            refuse_for_architecture(cell.recipe, cell.quant, config)
            backend.check_model(cell.quant, config)
    except UnsupportedCellError as err:
        record.update(status="skipped", reason=str(err))
        store.write(record)
        log.warning("cell %s skipped: %s", label, err)
        return record

    model = None
    items: dict[str, Any] | None = None
    try:
        _seed_everything(cell.seed)
        if cell.backend.threads:
            torch.set_num_threads(cell.backend.threads)
        resolve_device(cell.backend.device)  # a device this machine lacks fails here, before loading
        t0 = time.perf_counter()
        loaded = load_model(cell.model, cell.cache_dir)  # once per process; later cells reuse it
        record["model_fingerprint"] = loaded.fingerprint
        record["timings"]["load"] = time.perf_counter() - t0
        if config is None and (config := peek_config(cell.model, cell.cache_dir)) is not None:
            # a config known only now (a GGUF converted by this load): what preflight could not check
            check_model_limits(cell, limits_of(config))
            refuse_for_architecture(cell.recipe, cell.quant, config)
            backend.check_model(cell.quant, config)
        t0 = time.perf_counter()
        # tokenized at most once per cell, whether the recipe, static scales or the backend ask
        calibration = functools.cache(functools.partial(calibration_for, cell, loaded.tokenizer))
        gpu = watch_gpu_memory(cell.backend.device)
        model, record["quantized_cache"], placement = _quantized_model(cell, loaded, calibration)
        record["placement"] = placement.as_record()
        if gpu:
            record["memory"] = {"gpu_peak_quantize_gib": gpu_peak_gib(gpu)}
        record["timings"]["quantize"] = time.perf_counter() - t0
        log.info(
            "cell %s: quantized in %.1fs%s",
            label,
            record["timings"]["quantize"],
            " (from the quantized-model cache)" if record["quantized_cache"] == "hit" else "",
        )
        # what was quantized, by kind of weight; a spec that leaves eligible weights in full
        # precision fails here, naming them, before any evaluation
        weights = coverage.account(model, cell.quant)
        record["coverage"] = weights.as_record() if quantized(cell.quant.w) else {}
        if (kv_layers := getattr(model, KV_LAYERS_ATTR, None)) is not None:
            record["coverage"]["kv"] = {"layers": kv_layers[0], "cache_layers": kv_layers[1]}
            if contents := cache_contents(model):
                record["coverage"]["kv"]["cache"] = contents
            if mixers := coverage.state_space_mixers(model):  # a hybrid: say what KV leaves alone
                record["coverage"]["kv"]["state_space_mixers"] = mixers
                record["coverage"]["kv"]["note"] = (
                    f"the recurrent states of {mixers} state-space mixers are not quantized: a KV spec "
                    "quantizes keys and values only"
                )
        if quantized(cell.quant.w):
            log.info("cell %s: %s", label, weights.summary())
        coverage.check(weights, cell.quant)
        request = OpenRequest(
            model=model,
            tokenizer=loaded.tokenizer,
            spec=cell.quant,
            seed=cell.seed,
            export_root=cache_root(cell.cache_dir) / "exports",
            export_name=f"{label}-{hash_[:12]}",
            calibration=calibration,
            provenance={"cell": label, "hash": hash_, "method": cell.recipe.name},
            record=record,
            placement=placement,
        )
        model = None  # the request holds it; a backend that exports may let it go
        with backend.open(request) as scorer:
            scores = evaluate_suite(
                scorer,
                loaded.tokenizer,
                cell.suite,
                eval_settings(cell, placement),
                reference_fingerprint=loaded.fingerprint,
                reference_loader=loaded.fresh_copy,  # only for a plugin that reads ctx.reference late
                **_task_checkpoints(store, hash_, loaded.fingerprint),
            )
        record["metrics"], record["timings"]["eval"] = scores.metrics, scores.seconds
        if gpu:
            record["memory"]["gpu_peak_gib"] = gpu_peak_gib(gpu)
        items = scores.items
        del request, scorer
        record["status"] = "ok"
    except UnsupportedCellError as err:
        record.update(status="skipped", reason=str(err))
        log.warning("cell %s skipped: %s", label, err)
    except Exception as err:  # noqa: BLE001 - a failed cell is recorded, the sweep goes on
        record.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("cell %s failed: %s", label, record["reason"])
    finally:
        del model
        release_device_memory()  # the next cell (or a vLLM engine) sees the memory this one held
    record["timings"]["total"] = time.perf_counter() - t_start
    record["finished_at"] = time.time()
    path = store.write(record, items if record["status"] == "ok" else None)
    log.info("cell %s: %s -> %s", label, record["status"], path)
    return record
