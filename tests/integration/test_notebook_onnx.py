"""notebooks/06-onnx.ipynb runs headless through a real kernel on the embedded model. Its
exports (fp32, int8, int4) go to the user cache: only the first run pays for them."""
from __future__ import annotations

import pytest
from run_notebook import error_outputs, run

from paths import ROOT


def outputs(cell) -> str:
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "") for out in cell.get("outputs", []))


@pytest.mark.embedded
@pytest.mark.slow
def test_onnx_notebook(embedded_model):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    nb = run(ROOT / "notebooks" / "06-onnx.ipynb")
    assert error_outputs(nb) == []
    cells = {c.source.splitlines()[0]: outputs(c) for c in nb.cells if c.cell_type == "code" and c.source}
    assert "Paris" in cells["%%generate --backend onnx-fp32 --temperature 0 --max-tokens 12"]
    assert "static" in cells["import jupyter_llm as jl"]
    table = cells["%run ../benchmarks/engine_bench.py --quick --engines onnx-fp32,onnx-int8,onnx-int4 "
                  "--scenarios single,batch,quality --batch 8 --no-memory --no-save --quiet"]
    for word in ("fp32", "int8", "int4", "exact match", "perplexity"):
        assert word in table
