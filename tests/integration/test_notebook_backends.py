"""notebooks/05-backends.ipynb runs headless through a real kernel: five backends, one answer."""
from __future__ import annotations

import pytest
from run_notebook import error_outputs, run

from paths import ROOT


def outputs_of(nb, startswith: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith))
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "") for out in cell.outputs)


@pytest.mark.embedded
@pytest.mark.slow
def test_backends_notebook(embedded_model):
    pytest.importorskip("llama_cpp")
    nb = run(ROOT / "notebooks" / "05-backends.ipynb")
    assert error_outputs(nb) == []
    listing = outputs_of(nb, "%llm_backend --list")
    assert "llamacpp" in listing and "jupyter-llm[vllm]" in listing
    table = outputs_of(nb, "import pandas")
    for name in ("native", "hf", "llamacpp", "llama-server", "own-server"):
        assert name in table
    assert table.count("Paris") == 5
