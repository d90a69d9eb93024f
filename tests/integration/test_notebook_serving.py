"""notebooks/04-serving.ipynb runs headless through nbclient and a real kernel, on the embedded
model, without an error output: start, call with openai and curl, metrics, keys, stop."""
from __future__ import annotations

import json

import pytest
from run_notebook import error_outputs, run

from paths import ROOT


def outputs_of(nb, startswith: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith))
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "") for out in cell.outputs)


@pytest.mark.embedded
def test_serving_notebook(embedded_model):
    nb = run(ROOT / "notebooks" / "04-serving.ipynb")
    assert error_outputs(nb) == []
    assert "OpenAI-compatible server at http://127.0.0.1:" in outputs_of(nb, "%llm_serve --port 0")
    assert "Paris" in outputs_of(nb, "from openai import OpenAI")
    assert "completion_tokens" in outputs_of(nb, "stream = client")
    completion = json.loads(outputs_of(nb, "import json"))
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] > 0
    refused = outputs_of(nb, 'out = subprocess.run(["curl", "-s", "-w"')
    assert '"type":"invalid_request_error"' in refused and "HTTP 400" in refused
    metrics = outputs_of(nb, "import httpx")
    assert 'jupyter_llm:num_requests_running{model_name="hf"} 0.0' in metrics
    assert "jupyter_llm:generation_tokens_total" in metrics
    assert "401 without a key" in outputs_of(nb, "keyed = ") and "200 with the key" in outputs_of(nb, "keyed = ")
    assert outputs_of(nb, "%llm_serve --stop").count("stopped the server at") == 2
