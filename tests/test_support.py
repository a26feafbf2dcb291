"""qeval-support: the support matrix is what the code does, and docs/SUPPORT.md is its output."""

from __future__ import annotations

from pathlib import Path

from qeval.support import main, matrix

DOC = Path(__file__).resolve().parents[1] / "docs" / "SUPPORT.md"


def _doc_statuses() -> dict[tuple[str, str, str], str]:
    """(family, method, quant) -> "ok" / "refused" from the table in docs/SUPPORT.md."""
    rows = [line.strip().strip("|").split("|") for line in DOC.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    out = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row]
        if cells[0] == "family" or set(cells[0]) <= {"-"}:
            continue
        for quant, value in zip(header[2:], cells[2:]):
            out[cells[0], cells[1], quant] = value.split(" ")[0]
    return out


def test_the_matrix_is_what_quantization_does_and_the_doc_says_so():
    result = matrix(["llama", "mixtral", "mamba"], ["rtn", "gptq", "awq", "quarot"], ["w4g128", "kv4"])
    llama, mixtral, mamba = result["llama"], result["mixtral"], result["mamba"]
    assert llama["rtn"]["w4g128"].ok and llama["rtn"]["w4g128"].detail == "100%" and llama["rtn"]["kv4"].ok
    assert llama["gptq"]["w4g128"].ok and "does not support tensor type KV" in llama["gptq"]["kv4"].detail
    assert mixtral["rtn"]["w4g128"].ok and mixtral["rtn"]["w4g128"].detail == "100%"
    assert mixtral["gptq"]["w4g128"].ok and mixtral["gptq"]["w4g128"].detail == "100%"
    assert mixtral["awq"]["w4g128"].ok and mixtral["awq"]["w4g128"].detail == "100%"
    assert not mixtral["quarot"]["w4g128"].ok and "fused expert tensor" in mixtral["quarot"]["w4g128"].detail
    assert mamba["rtn"]["w4g128"].ok and "nothing to quantize" in mamba["rtn"]["kv4"].detail
    assert mamba["gptq"]["w4g128"].ok and mamba["gptq"]["w4g128"].detail == "100%"
    documented = _doc_statuses()
    for family, methods in result.items():
        for method, cells in methods.items():
            for quant, outcome in cells.items():
                assert documented[family, method, quant] == ("ok" if outcome.ok else "refused"), (family, method, quant)


def test_cli_names_an_unknown_family(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--families", "llama,nope"])
    assert "unknown families ['nope']" in capsys.readouterr().err
