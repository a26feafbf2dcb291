"""One copy of the model in memory: a sweep's cells each load their own unquantized copy,
quantize it in place and evaluate it, and nothing keeps a second model beside it.

What the quantized cell is compared with (the FP distributions for KL divergence) is computed
on the cell's own copy before it is quantized, and cached; the numbers are exactly those of
cells run one by one."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import require_eval_data
from transformers import PreTrainedModel

from qeval.cell import build_cell
from qeval.cli import compose_config
from qeval.config import ActivationSpec, ModelSpec, QuantSpec, WeightSpec
from qeval.models.loading import clear_process_cache, load_model, weights_fingerprint
from qeval.models.tiny import build_tiny_model, byte_tokenizer
from qeval.quant.apply import quantize_model
from qeval.quant.linear import QuantLinear
from qeval.quant.recipe import get_method

CALIB = [torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
W4 = QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32))
W4_EMB = QuantSpec(name="w4g32", w=WeightSpec(bits=4, group_size=32), quantize_embeddings=True)
W8A8 = QuantSpec(name="w8a8", w=WeightSpec(bits=8, granularity="channel"), a=ActivationSpec(bits=8))

# every kind of in-place change a method makes: rounding, smoothing (norms and weights scaled),
# rotation (norms folded, head untied, embeddings rotated), LET (norm shifts, new biases),
# learned clipping, and an untied head from quantizing the embeddings
METHODS = [
    ("rtn", W4),
    ("gptq", W4),
    ("awq", W4),
    ("omniquant", W4),
    ("omniquant", W8A8),
    ("smoothquant", W8A8),
    ("quarot", W4),
    ("rtn", W4_EMB),
]


def _live_models() -> int:
    """Whole models alive (a CausalLM holds its base model, also a PreTrainedModel: not counted)."""
    gc.collect()
    return sum(
        1 for obj in gc.get_objects() if isinstance(obj, PreTrainedModel) and type(obj).__name__.endswith("ForCausalLM")
    )


@pytest.fixture()
def local_llama(tmp_path):
    """A tiny Llama with tied embeddings saved as a safetensors folder: loaded like a user's
    model (memory-mapped files), the case where writing into a loaded tensor could reach the
    file or another load."""
    model = build_tiny_model("llama", seed=5)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    clear_process_cache()
    yield ModelSpec(name="local-llama", source="local", path=str(tmp_path / "m"))
    clear_process_cache()


@pytest.mark.parametrize(
    ("method", "spec"), METHODS, ids=[f"{m}-{s.name}{'-emb' * s.quantize_embeddings}" for m, s in METHODS]
)
def test_a_copy_after_a_quantized_cell_is_a_fresh_load(local_llama, method, spec):
    """Quantizing one copy in place leaves the next copy bit-identical to the first load: the
    source (the model's files) is never written through, whatever the method changed."""
    loaded = load_model(local_llama)
    first = loaded.fresh_copy()
    assert weights_fingerprint(first) == loaded.fingerprint
    quantize_model(first, spec, get_method(method), calibration=lambda: CALIB)
    assert weights_fingerprint(first) != loaded.fingerprint  # the method really changed it
    again = loaded.fresh_copy()
    assert again is not first
    assert weights_fingerprint(again) == loaded.fingerprint
    x = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(x).logits, build_tiny_model("llama", seed=5)(x).logits)


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_a_loaded_model_owns_its_memory(tmp_path):
    """transformers hands out tensors backed by the memory-mapped safetensors files; qeval copies
    them into the process's own memory at load, so rounded weights replace them instead of
    piling up beside resident file pages (measured on a 10.6 GiB model before the copy: 11.4 GiB
    of mapped pages beside 8.7 GiB of new weights; docs/BENCHMARKS.md)."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    if not sys.platform.startswith("linux"):
        pytest.skip("reads RssFile from /proc/self/status")
    config = AutoConfig.for_model(
        "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, vocab_size=512
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size

    def file_pages_after(load) -> int:
        gc.collect()
        before = _rss_file_bytes()
        model = load()
        weights_fingerprint(model)  # reads every byte of every tensor
        grown = _rss_file_bytes() - before
        del model
        gc.collect()
        return grown

    raw = file_pages_after(lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
    if raw < size // 2:
        pytest.skip(f"transformers did not map the file here ({raw} of {size} bytes resident as file pages)")
    clear_process_cache()
    spec = ModelSpec(name="mapped", source="local", path=str(tmp_path / "m"))
    ours = file_pages_after(lambda: load_model(spec).fresh_copy())
    clear_process_cache()
    assert ours < size // 4, (ours, raw, size)


def test_without_an_exporter_a_quantized_model_keeps_no_codes():
    """The integer codes beside the dequantized weights are a second copy of each weight: kept
    only for an exporter or the quantized-model cache (keep_codes), so an hf cell's quantized
    model costs what the model did."""
    model = build_tiny_model("llama")
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize_model(model, W4, get_method("gptq"), calibration=lambda: CALIB, keep_codes=False)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qweight is None for m in linears)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held <= before
    kept = build_tiny_model("llama")
    quantize_model(kept, W4, get_method("gptq"), calibration=lambda: CALIB)  # the default keeps them
    assert all(m.qweight is not None for m in kept.modules() if isinstance(m, QuantLinear))


def test_a_sweep_holds_one_model_and_gives_the_numbers_of_cells_run_alone(tmp_path, monkeypatch):
    """Three cells in one process (the FP cell last, so each quantized cell must build its own
    FP reference before quantizing): while each is evaluated exactly one model exists, and every
    metric equals that of the same cell run alone in a fresh process state."""
    require_eval_data()
    from qeval import runner

    live: list[int] = []
    evaluate = runner.evaluate_suite

    def counting(*args, **kwargs):
        live.append(_live_models())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_suite", counting)
    cells = [("w4g128", "gptq"), ("w8a8", "smoothquant"), ("fp16", "rtn")]

    def overrides(quant: str, method: str, results: str) -> list[str]:
        return [
            "model=tiny-llama",
            "suite=tiny",
            f"quant={quant}",
            f"method={method}",
            "calib.nsamples=4",
            "calib.seqlen=64",
            f"results_dir={results}",
        ]

    clear_process_cache()
    together = [runner.run_cell(build_cell(compose_config(overrides(q, m, tmp_path / "sweep")))) for q, m in cells]
    assert [r["status"] for r in together] == ["ok"] * 3
    assert live == [1, 1, 1], live
    alone = []
    for q, m in cells:
        clear_process_cache()
        alone.append(runner.run_cell(build_cell(compose_config(overrides(q, m, tmp_path / f"alone-{q}")))))
    for a, b in zip(together, alone):
        assert a["metrics"] == b["metrics"], a["label"]
    # the quantized cells were compared with the FP model: KL divergence is there, and positive
    assert together[0]["metrics"]["wikitext2"]["kld"] > 0
    clear_process_cache()
