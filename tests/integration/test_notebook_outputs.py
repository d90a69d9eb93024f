"""What an executed notebook keeps (nbclient through a real kernel, as nbconvert runs it): each
display in its last update. Progress bars end at their final count; a JSON-constrained answer
ends pretty-printed, not as the raw tokens that streamed."""
from __future__ import annotations

import json

import jsonschema
import nbformat
import pytest
from nbclient import NotebookClient
from run_notebook import error_outputs

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
          "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}}


def outputs_of(nb, prefix):
    [cell] = [c for c in nb.cells if c.source.startswith(prefix)]
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]


def test_an_executed_notebook_keeps_final_progress_and_rendered_json(tiny_llama, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
        "%load_ext jupyter_llm",
        f"%llm_backend hf {tiny_llama} --name tiny --threads 1",
        f"schema = {SCHEMA!r}",
        "%%generate --json-schema schema --max-tokens 30 --temperature 1 --seed 1 -o out\nAnswer:",
        "print(json.dumps(out[0].parsed))",
        "%llm_bench --num-prompts 3 --prompt-len 4 --max-tokens 2 --concurrency 1 --warmup 0 --no-plot",
    )])
    nb.cells.insert(0, nbformat.v4.new_code_cell("import json"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert error_outputs(nb) == []

    [loading] = outputs_of(nb, "%llm_backend")  # ours only: transformers' own bar is off inside it
    assert "(transformers): 100%" in loading.data["text/plain"] and " 2/2 " in loading.data["text/plain"]
    assert "<progress value='2' max='2'>" in loading.data["text/html"]
    bench_bar = outputs_of(nb, "%llm_bench")[0]
    assert "Benchmark: 100%" in bench_bar.data["text/plain"] and " 3/3 " in bench_bar.data["text/plain"]

    [answer] = outputs_of(nb, "%%generate")
    [printed] = [o.text for c in nb.cells if c.source.startswith("print(") for o in c.outputs]
    parsed = json.loads(printed)
    jsonschema.validate(parsed, SCHEMA)
    assert answer.data["text/plain"] == json.dumps(parsed, indent=2)
    assert answer.data["text/markdown"] == f"```json\n{json.dumps(parsed, indent=2)}\n```"
