"""The sampling-playground guide executes headless through a real kernel, widgets included."""
from __future__ import annotations

import pytest
from run_notebook import error_outputs, run

from paths import ROOT

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def outputs_text(cell) -> str:
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "") for out in cell.get("outputs", []))


@pytest.mark.embedded
def test_playground_notebook(embedded_model):
    nb = run(ROOT / "notebooks" / "02-sampling-playground.ipynb")
    assert error_outputs(nb) == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    answer = next(c for c in code if c.source.startswith('pg.prompt = "The capital of France is"'))
    assert "Paris" in outputs_text(answer) and "length" in outputs_text(answer)
    compared = next(c for c in code if c.source.startswith('pg.prompt = "The three primary colours are"'))
    hf, native = outputs_text(compared).strip().splitlines()
    assert hf.split("(")[0].split(":", 1)[1] == native.split("(")[0].split(":", 1)[1]  # greedy parity
    shown = {out["data"][WIDGET_VIEW]["model_id"] for c in code for out in c.get("outputs", [])
             if WIDGET_VIEW in out.get("data", {})}
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    playgrounds = {key: s["state"] for key, s in states.items()
                   if s["state"].get("_anywidget_id") == "jupyter_llm.notebook.widgets.playground.Playground"}
    assert len(playgrounds) == 2 and set(playgrounds) <= shown  # pg and %llm_playground's
    first = next(s for s in playgrounds.values() if s["compare"] == "native")
    assert first["error"] == "" and not first["running"] and first["backends"] == ["hf", "native"]
