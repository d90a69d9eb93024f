"""Every runnable guide executes headless through a real kernel without error outputs."""
from __future__ import annotations

import pytest
from run_notebook import error_outputs, run

from paths import ROOT


def cell_text(nb, index):
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "")
                   for out in nb.cells[index].get("outputs", []))


@pytest.mark.embedded
def test_quickstart(embedded_model):
    nb = run(ROOT / "notebooks" / "01-quickstart.ipynb")
    assert error_outputs(nb) == []
    answer = next(i for i, c in enumerate(nb.cells) if c.source.startswith("%%generate --chat --temperature 0"))
    assert "Paris" in cell_text(nb, answer)


@pytest.mark.embedded
def test_benchmarking(embedded_model):
    nb = run(ROOT / "notebooks" / "03-benchmarking.ipynb")
    assert error_outputs(nb) == []
    bench = next(i for i, c in enumerate(nb.cells) if c.source.startswith("%llm_bench --backends native,hf,llamacpp"))
    outputs = nb.cells[bench].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), "the charts are inline images"
    table = cell_text(nb, bench)
    for target in ("native", "hf", "llamacpp", "llama-cpp-python server"):
        assert target in table
    assert "failed requests" not in table


@pytest.mark.embedded
def test_speculative_decoding(embedded_model):
    nb = run(ROOT / "notebooks" / "07-speculative-decoding.ipynb")
    assert error_outputs(nb) == []
    streamed = next(i for i, c in enumerate(nb.cells) if c.source.startswith("%%generate --backend ngram"))
    assert "received" in cell_text(nb, streamed)  # the typo fixed, as the prompt's other words copied
    table = next(i for i, c in enumerate(nb.cells) if c.source.startswith("import pandas"))
    text = cell_text(nb, table)
    for column in ("decode tok/s", "speed-up", "acceptance", "same output as plain"):
        assert column in text
    assert "False" not in text  # greedy output identical with and without speculation
    status = next(i for i, c in enumerate(nb.cells) if c.source.strip() == "%llm_backend")
    assert "spec_acceptance_rate" in cell_text(nb, status)
