"""On a CUDA GPU: quantization, calibration (resident and offloaded), KV quantization and a
whole cell run there, and the GPU memory is given back afterwards.

Marked ``gpu`` and skipped, saying why, on a machine without one (the default run includes
them, so a GPU machine runs them without being asked): ``python -m pytest -m gpu``.  The CPU
half of the same logic (device and dtype choice, the resident/offloaded plan, one block at a
time with unchanged numbers) is tests/test_placement.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_eval_data

from qeval import placement as pl
from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
from qeval.models.tiny import build_tiny_model
from qeval.quant.apply import quantize_model
from qeval.quant.linear import QuantLinear
from qeval.quant.recipe import get_method

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU (torch {torch.__version__} sees none)"),
]

CALIB = [torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
W4 = QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32))
W8A8_STATIC = QuantSpec(
    name="w8a8s",
    w=WeightSpec(bits=8, granularity="channel"),
    a=ActivationSpec(bits=8, granularity="tensor", dynamic=False),
)
KV4 = QuantSpec(name="kv4", kv=KVSpec(bits=4))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float().cpu() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["gptq", "awq", "quarot"])
def test_a_method_on_the_gpu_agrees_with_the_cpu(method):
    """The same method on the same float32 model, on the GPU and on the CPU: rounding may differ
    where a value sits on a grid boundary (other kernels, other summation order), nowhere else."""
    cpu = build_tiny_model("llama", seed=2)
    quantize_model(cpu, W4, get_method(method), calibration=lambda: CALIB)
    gpu = build_tiny_model("llama", seed=2).to("cuda")
    quantize_model(gpu, W4, get_method(method), calibration=lambda: [b.cuda() for b in CALIB])
    a, b = _weights(cpu), _weights(gpu)
    assert a.keys() == b.keys() and a
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert same > 0.97, same
    x = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), cpu(x).logits, atol=0.05, rtol=0.05)


def test_offloaded_calibration_holds_one_block_on_the_gpu():
    """Weights in CPU memory, one block at a time on the GPU: the GPU's peak stays far below
    the model, the model is back in CPU memory afterwards, and it equals the resident result."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, vocab_size=512
    )
    torch.manual_seed(0)
    resident = AutoModelForCausalLM.from_config(config).eval()
    offloaded = AutoModelForCausalLM.from_config(config).eval()
    offloaded.load_state_dict(resident.state_dict())
    calib = [torch.randint(3, 512, (1, 128), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    weights = pl.tensor_bytes(resident)
    resident.cuda()
    quantize_model(resident, W4, get_method("gptq"), calibration=lambda: [b.cuda() for b in calib])
    pl.release_device_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with pl.placed_as(pl.Placement(torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 0))):
        quantize_model(offloaded, W4, get_method("gptq"), calibration=lambda: calib)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < weights / 2, (peak, weights)
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    a, b = _weights(resident), _weights(offloaded)
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert same > 0.99, same


@pytest.mark.parametrize("spec", [W8A8_STATIC, KV4], ids=["w8a8-static", "kv4"])
def test_activation_and_kv_quantization_run_on_the_gpu(spec):
    model = build_tiny_model("llama", seed=1).to("cuda")
    quantize_model(model, spec, get_method("rtn"), calibration=lambda: [b.cuda() for b in CALIB])
    x = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        logits = model(x).logits
        out = model.generate(x, max_new_tokens=8, do_sample=False)
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
    assert out.shape == (1, 40)


def test_a_cuda_cell_runs_in_bfloat16_and_gives_the_memory_back(tmp_path):
    require_eval_data()
    from qeval import runner
    from qeval.cell import build_cell
    from qeval.cli import compose_config
    from qeval.models.loading import clear_process_cache

    clear_process_cache()
    over = ["model=tiny-llama", "suite=tiny", "quant=w4g128", "method=gptq", "backend.device=cuda"]
    cell = build_cell(compose_config([*over, "calib.nsamples=4", "calib.seqlen=64", f"results_dir={tmp_path}"]))
    assert cell.model.dtype == "bfloat16"
    record = runner.run_cell(cell)
    clear_process_cache()
    pl.release_device_memory()
    assert record["status"] == "ok", record.get("reason")
    assert record["placement"]["compute"].startswith("cuda") and record["memory"]["gpu_peak_gib"] > 0
    assert torch.cuda.memory_allocated() < 64 * 2**20  # nothing of the cell stays on the GPU
