"""Where a cell computes and where its weights rest (qeval.placement), as far as a CPU allows.

The device and dtype choices and the resident-or-offloaded plan are pure decisions, tested on
numbers.  The offloaded path itself (each decoder block moved to the compute device for its
turn, activations resting elsewhere, whole-model forwards streamed one block at a time) runs
for real on the CPU with ``cpu:0`` as the compute device: torch treats it as a device distinct
from ``cpu`` (so every onload and offload happens) while the tensors stay where they are, so
the test can count the moves and demand the very numbers of the resident path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_eval_data

from qeval import placement as pl
from qeval.cell import build_cell
from qeval.cli import compose_config
from qeval.config import ActivationSpec, ConfigError, QuantSpec, WeightSpec
from qeval.models.adapters import ADAPTERS
from qeval.models.loading import clear_process_cache, weights_fingerprint
from qeval.models.tiny import build_tiny_model
from qeval.placement import Placement, plan_placement
from qeval.quant.apply import quantize_model
from qeval.quant.recipe import get_method

GIB = 2**30
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
# a compute device that torch tells apart from "cpu" but that holds the same memory
STAND_IN = torch.device("cpu", 0)
CALIB = [torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(3)]
W4 = QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32))
W8A8_STATIC = QuantSpec(
    name="w8a8s",
    w=WeightSpec(bits=8, granularity="channel"),
    a=ActivationSpec(bits=8, granularity="tensor", dynamic=False),
)


# --- the device, the dtype ------------------------------------------------------------------


def test_auto_is_the_gpu_when_one_is_visible_else_the_cpu(monkeypatch):
    monkeypatch.setattr(pl, "cuda_available", lambda: False)
    assert pl.resolve_device("auto") == CPU
    assert pl.resolve_device("cpu") == CPU
    monkeypatch.setattr(pl, "cuda_available", lambda: True)
    monkeypatch.setattr(pl, "cuda_device_count", lambda: 2)
    assert pl.resolve_device("auto") == torch.device("cuda")
    assert pl.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_device_this_machine_lacks_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(pl, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match=r"backend.device='cuda'.*sees no GPU"):
        pl.resolve_device("cuda")
    monkeypatch.setattr(pl, "cuda_available", lambda: True)
    monkeypatch.setattr(pl, "cuda_device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"backend.device='cuda:2'.*below 2"):
        pl.resolve_device("cuda:2")
    for bad in ("gpu", "tpu", "cuda:x"):
        with pytest.raises(ConfigError, match="backend.device"):
            pl.check_device_name(bad)


def test_dtype_auto_is_float32_on_the_cpu_and_bfloat16_on_a_gpu(monkeypatch):
    assert pl.resolve_dtype("auto", CPU) == "float32"
    assert pl.resolve_dtype("float16", CPU) == "float16"
    monkeypatch.setattr(pl, "cuda_available", lambda: False)  # a cluster's login node plans the sweep
    assert pl.resolve_dtype("auto", GPU) == "bfloat16"
    monkeypatch.setattr(pl, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert pl.resolve_dtype("auto", GPU) == "float16"


def test_the_cell_names_what_runs_and_cpu_hashes_do_not_move(monkeypatch):
    """model.dtype=auto and backend.device=auto are resolved when the cell is built: on a CPU
    machine the cell is the explicit float32/cpu cell, hash included; with a GPU visible it is
    a bfloat16 cuda cell (another identity: other numbers)."""
    monkeypatch.setattr(pl, "cuda_available", lambda: False)
    base = ["model=tiny-llama", "suite=tiny", "quant=w4g128"]
    auto = build_cell(compose_config([*base, "backend.device=auto"]))
    explicit = build_cell(compose_config([*base, "model.dtype=float32", "backend.device=cpu"]))
    assert (auto.model.dtype, auto.backend.device) == ("float32", "cpu")
    assert auto.hash == explicit.hash
    monkeypatch.setattr(pl, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = build_cell(compose_config([*base, "backend.device=auto"]))
    assert (gpu.model.dtype, gpu.backend.device) == ("bfloat16", "cuda")
    assert gpu.hash != explicit.hash


def test_bad_batch_sizes_and_offload_values_fail_naming_the_key():
    base = ["model=tiny-llama", "suite=tiny"]
    with pytest.raises(ConfigError, match="suite.tasks.wikitext2.batch_size=0"):
        build_cell(compose_config([*base, "suite.tasks.wikitext2.batch_size=0"]))
    with pytest.raises(ConfigError, match="batch_size='big'"):
        build_cell(compose_config([*base, "suite.tasks.wikitext2.batch_size=big"]))
    assert build_cell(compose_config([*base, "suite.tasks.wikitext2.batch_size=auto"]))
    with pytest.raises(ConfigError, match="backend.offload"):
        build_cell(compose_config([*base, "backend.offload=sometimes"]))


def test_batch_size_auto_is_lm_evals_search_only_on_a_gpu():
    from qeval.config import TaskEntry
    from qeval.eval.suite import AUTO_BATCH_FALLBACK, batch_size_for

    auto, fixed = TaskEntry(task="x", batch_size="auto"), TaskEntry(task="x", batch_size=8)
    assert batch_size_for(auto, "lm_eval", "cuda") == "auto"
    assert batch_size_for(auto, "lm_eval", "cpu") == AUTO_BATCH_FALLBACK
    assert batch_size_for(auto, "native", "cuda") == AUTO_BATCH_FALLBACK
    assert batch_size_for(fixed, "lm_eval", "cuda") == 8


# --- the plan -------------------------------------------------------------------------------


def test_a_model_that_fits_stays_resident():
    plan = plan_placement(GPU, weight_bytes=16 * GIB, block_bytes=GIB // 2, activation_bytes=GIB, free=80 * GIB)
    assert plan.resident and plan.activations == GPU


def test_a_model_larger_than_the_gpu_is_offloaded_one_block_at_a_time():
    # a 70B model in bf16 (140 GB) on an 80 GB GPU: blocks of 1.7 GB, activations of 4 GB
    plan = plan_placement(GPU, 140 * GIB, int(1.7 * GIB), 4 * GIB, free=80 * GIB)
    assert not plan.resident
    assert (plan.compute, plan.home, plan.activations) == (GPU, CPU, GPU)
    assert "140.0 GiB" in plan.reason
    # activations that do not fit beside a block rest in CPU memory
    plan = plan_placement(GPU, 140 * GIB, int(1.7 * GIB), 90 * GIB, free=80 * GIB)
    assert (plan.home, plan.activations) == (CPU, CPU)


def test_offload_never_and_always_and_a_block_too_large_for_the_device():
    with pytest.raises(ConfigError, match=r"backend.offload=never.*140.0 GiB"):
        plan_placement(GPU, 140 * GIB, GIB, GIB, free=80 * GIB, offload="never")
    forced = plan_placement(GPU, GIB, GIB // 8, GIB // 8, free=80 * GIB, offload="always")
    assert not forced.resident and "always" in forced.reason
    with pytest.raises(ConfigError, match="one decoder block"):
        plan_placement(GPU, 400 * GIB, 30 * GIB, GIB, free=24 * GIB)
    assert plan_placement(CPU, 400 * GIB, 30 * GIB, GIB, free=None).resident  # RAM is qeval.memory's business


# --- the offloaded path, for real on the CPU ------------------------------------------------


class MoveLog:
    """Spy on qeval.placement.move: which decoder blocks are on the compute device at each
    moment, and the most at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, blocks: list[torch.nn.Module]) -> None:
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.on_compute: set[int] = set()
        self.most = 0
        self.onloads: list[int] = []
        real = pl.move

        def move(module: torch.nn.Module, device: torch.device) -> None:
            if id(module) in self.index:
                i = self.index[id(module)]
                if device == STAND_IN:
                    self.on_compute.add(i)
                    self.onloads.append(i)
                else:
                    self.on_compute.discard(i)
                self.most = max(self.most, len(self.on_compute))
            real(module, device)

        monkeypatch.setattr(pl, "move", move)


OFFLOADED = Placement(STAND_IN, CPU, CPU, reason="test")


@pytest.mark.parametrize(
    ("method", "spec"),
    [("gptq", W4), ("awq", W4), ("smoothquant", W8A8_STATIC), ("omniquant", W4), ("quarot", W4)],
    ids=["gptq", "awq", "smoothquant-static", "omniquant", "quarot"],
)
def test_offloaded_calibration_moves_one_block_at_a_time_and_changes_no_number(monkeypatch, method, spec):
    """Each block is on the compute device only for its turn (never two at once); the
    quantized model is bit-identical to the resident path's, and every block is home after."""
    resident = build_tiny_model("llama", seed=3)
    quantize_model(resident, spec, get_method(method), calibration=lambda: CALIB)
    offloaded = build_tiny_model("llama", seed=3)
    blocks = list(ADAPTERS["llama"].get_blocks(offloaded))
    log = MoveLog(monkeypatch, blocks)
    with pl.placed_as(OFFLOADED):
        quantize_model(offloaded, spec, get_method(method), calibration=lambda: CALIB)
    assert log.most == 1, log.most
    assert set(log.onloads) == set(range(len(blocks)))  # every block had its turn
    assert not log.on_compute  # and went home
    assert weights_fingerprint(offloaded) == weights_fingerprint(resident)
    x = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(offloaded(x).logits, resident(x).logits)


def test_offloaded_activations_are_handed_out_one_batch_at_a_time():
    tensors = [torch.full((1, 4, 8), float(i)) for i in range(3)]
    acts = pl.Activations(tensors, compute=STAND_IN, store=CPU)
    assert len(acts) == 3 and acts.nbytes() == 3 * 4 * 8 * 4
    assert [float(t[0, 0, 0]) for t in acts] == [0.0, 1.0, 2.0]
    assert [float(t[0, 0, 0]) for t in acts[1:]] == [1.0, 2.0]


def test_a_streamed_forward_equals_the_resident_forward_and_leaves_everything_home(monkeypatch):
    model = build_tiny_model("llama", seed=4)
    x = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
        log = MoveLog(monkeypatch, list(ADAPTERS["llama"].get_blocks(model)))
        with pl.streamed(model, OFFLOADED):
            got = model(x).logits
    assert torch.equal(got, want)
    assert log.most == 1 and len(log.onloads) == model.config.num_hidden_layers and not log.on_compute
    # the hooks are gone: a later forward moves nothing
    with torch.no_grad():
        model(x)
    assert len(log.onloads) == model.config.num_hidden_layers


def test_an_offloaded_cell_gives_the_numbers_of_a_resident_one(tmp_path, monkeypatch):
    """A whole cell with its weights 'offloaded' (references, calibration, static scales,
    evaluation streamed block by block) records the resident cell's metrics exactly, and says
    where it ran."""
    require_eval_data()
    from qeval import runner

    def cell(results: str) -> dict:
        clear_process_cache()
        over = ["model=tiny-llama", "suite=tiny", "quant=w8a8", "method=gptq", "calib.nsamples=4"]
        return runner.run_cell(build_cell(compose_config([*over, "calib.seqlen=64", f"results_dir={results}"])))

    resident = cell(str(tmp_path / "resident"))
    monkeypatch.setattr(runner, "placement_for", lambda _cell, _model: OFFLOADED)
    offloaded = cell(str(tmp_path / "offloaded"))
    clear_process_cache()
    assert resident["status"] == offloaded["status"] == "ok"
    assert offloaded["metrics"] == resident["metrics"]
    assert resident["placement"] == {"compute": "cpu", "weights": "cpu", "activations": "cpu"}
    assert offloaded["placement"]["compute"] == "cpu:0" and offloaded["placement"]["reason"] == "test"


def test_a_static_scale_moves_with_its_quantizer():
    """Frozen static activation scales are buffers: they go wherever the model goes (a plain
    attribute stayed on the CPU when the model moved to a GPU after calibration)."""
    from qeval.quant.linear import ActivationQuantizer

    model = build_tiny_model("llama", seed=1)
    quantize_model(model, W8A8_STATIC, get_method("rtn"), calibration=lambda: CALIB)
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers
    for aq in quantizers:
        buffers = dict(aq.named_buffers())
        assert buffers.get("scale") is not None and buffers["scale"] is aq.scale
    assert not any("scale" in key for key in model.state_dict())  # not state: old caches still load


def test_a_sweep_on_a_machine_without_the_gpu_is_refused_before_any_cell(tmp_path, qeval_in_process):
    """backend.device=cuda where torch sees no GPU: exit 2 in the plan, naming the key, nothing
    loaded or recorded (a cluster launcher's plan leaves the check to the job: its node has the GPU)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = qeval_in_process(
        ["model=tiny-llama", "suite=tiny", "quant=fp16,w4g128", "backend.device=cuda", f"results_dir={tmp_path}"],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "backend.device='cuda'" in proc.stderr and "sees no GPU" in proc.stderr
    assert not list(tmp_path.glob("**/*.json"))


def test_only_local_launchers_check_the_device_in_the_plan():
    from omegaconf import OmegaConf

    from qeval.sweep import runs_here

    def launcher(target: str):
        return OmegaConf.create({"hydra": {"launcher": {"_target_": target}}})

    assert runs_here(launcher("hydra._internal.core_plugins.basic_launcher.BasicLauncher"))
    assert runs_here(launcher("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"))
    assert not runs_here(launcher("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"))
    assert not runs_here(launcher("hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"))
