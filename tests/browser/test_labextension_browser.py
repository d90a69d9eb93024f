"""The labextension in a real JupyterLab: %%generate highlighting, the status bar item, Stop generation.

Uses the tiny random Llama (tests/tiny_models.py) on the hf backend, so it is quick (~30 s).
JLLM_SCREENSHOTS=docs .venv/bin/python -m pytest tests/browser/test_labextension_browser.py
refreshes docs/labextension-*.png.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.browser]

NOTEBOOK = "labextension.ipynb"
STOP = "jupyter-llm:stop-generation"
STATUS = "#jupyter-llm-status"


def _notebook(model_dir: str) -> dict:
    def code(source: str) -> dict:
        return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}

    cells = [
        code(f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
             f"from tiny_models import tiny_llama_folder\n"
             f"folder = tiny_llama_folder(Path({model_dir!r}))\n"
             "import json\nconfig = json.loads((folder / 'config.json').read_text())\n"
             "config['max_position_embeddings'] = 65536  # room for a long generation\n"
             "(folder / 'config.json').write_text(json.dumps(config))\n"
             f"%load_ext jupyter_llm\n%llm_backend hf {{folder}} --threads 1"),
        code("reference = 'it' + \"s\"  # a Python string, for its token class"),
        code("%%generate --max-tokens 8 --temperature 0\nWhat's in {braces}? It's {{not}} code: don't close 'this"),
        code("%%generate --max-tokens 60000 --ignore-eos --temperature 1 --seed 1\nOnce upon a time"),
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


KERNEL_IDLE = """() => {
  const kernel = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
  return !!kernel && kernel.status === 'idle';
}"""

RUN_CELL = """async (index) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  panel.content.activeCellIndex = index;
  panel.content.mode = 'command';
  void app.commands.execute('notebook:run-cell');
}"""

CELL_COUNT = """(index) => window.jupyterapp.shell.currentWidget.content.widgets[index].model.executionCount"""

# Spans of the editor of cell `index`, with their classes (the syntax highlighting tokens).
TOKENS = """(index) => {
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[index];
  return [...cell.node.querySelectorAll('.cm-content .cm-line span')]
    .map((span) => ({text: span.textContent, cls: span.className}));
}"""

# Runs the command and measures how long the kernel takes to be idle afterwards.
STOP_AND_TIME = """async (command) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const t0 = performance.now();
  const idle = new Promise((resolve) => {
    const check = () => kernel.status === 'idle' ? resolve(performance.now() - t0) : setTimeout(check, 10);
    check();
  });
  const route = await window.jupyterapp.commands.execute(command);
  return {route, ms: await idle};
}"""


def _rate(text: str) -> float:
    match = re.search(r"([\d.]+)(k?) tok/s", text)
    return 0.0 if not match else float(match.group(1)) * (1000 if match.group(2) else 1)


def test_labextension_in_jupyterlab(jupyter_lab, page, screenshots, tmp_path):
    from playwright.sync_api import expect

    listed = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                            text=True, timeout=60)
    if "jupyter-llm" not in listed.stdout + listed.stderr:
        pytest.skip("the labextension is not installed (bash scripts/setup.sh builds and links it)")
    assert re.search(r"jupyter-llm v[\d.]+ .*enabled", listed.stdout + listed.stderr)

    (jupyter_lab.root / NOTEBOOK).write_text(json.dumps(_notebook(str(tmp_path / "tiny-llama"))))
    page.goto(jupyter_lab.open(NOTEBOOK))
    page.wait_for_function(KERNEL_IDLE, timeout=120_000, polling=200)
    status = page.locator(STATUS)
    expect(status).to_be_hidden()  # jupyter_llm is not loaded yet: the status bar shows nothing

    # 1. Highlighting: the Python cell has a string token; the %%generate cell has none.
    page.wait_for_function(f"() => ({TOKENS})(1).some((t) => t.text.includes(\"'it'\"))", polling=200)
    string_class = next(t["cls"] for t in page.evaluate(TOKENS, 1) if "'it'" in t["text"])
    assert string_class
    cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
    expect(cell.locator(".cm-line.jllm-magic-line")).to_have_count(1)  # the magic line stays a magic
    expect(cell.locator(".cm-line.jllm-magic-line")).to_contain_text("%%generate --max-tokens 8")
    page.wait_for_function(f"(cls) => !({TOKENS})(2).some((t) => t.cls === cls)", arg=string_class,
                           timeout=10_000, polling=100)
    tokens = page.evaluate(TOKENS, 2)
    assert not [t for t in tokens if t["cls"] == string_class], tokens
    assert not [t for t in tokens if "'" in t["text"] and t["cls"] == string_class]
    cell.screenshot(path=screenshots / "labextension-highlight.png")

    # 2. Status bar after %llm_backend.
    page.evaluate(RUN_CELL, 0)
    page.wait_for_function(f"() => ({CELL_COUNT})(0) !== null && ({KERNEL_IDLE})()", timeout=120_000, polling=200)
    errors = page.locator("[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()
    assert errors == [], errors
    expect(status).to_be_visible(timeout=10_000)
    expect(status).to_contain_text("LLM: hf")
    expect(status).to_contain_text("tiny-llama")

    # Clicking it shows the %llm_backend table.
    status.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog.locator("table.jllm-table")).to_be_visible()
    expect(dialog.locator("table.jllm-table")).to_contain_text("tokens/s")
    expect(dialog.locator("table.jllm-table td").first).to_have_text("hf")
    dialog.locator(".jp-Dialog-footer button").last.click()
    expect(dialog).to_be_hidden()

    # 3. A long generation: the status bar shows it running with a non-zero tokens/s.
    page.evaluate(RUN_CELL, 3)
    expect(status).to_contain_text("running", timeout=30_000)
    deadline = time.monotonic() + 30
    while _rate(status.inner_text()) <= 0 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert _rate(status.inner_text()) > 0, status.inner_text()
    generating = page.locator(".jp-Notebook .jp-Cell").nth(3)
    expect(generating.locator(".jp-OutputArea-output").first).not_to_be_empty()
    page.wait_for_timeout(1500)  # let it stream a while
    page.locator("#jp-main-statusbar").screenshot(path=screenshots / "labextension-statusbar.png")

    # 4. Stop generation (command palette item, keyboard shortcut): done within a second, output kept.
    bindings = page.evaluate(f"() => window.jupyterapp.commands.keyBindings"
                             f".filter((b) => b.command === '{STOP}').map((b) => b.keys.join(' '))")
    assert bindings, "no keyboard shortcut for Stop generation"
    assert page.evaluate(f"() => window.jupyterapp.commands.label('{STOP}')") == "Stop generation"
    assert page.evaluate(KERNEL_IDLE) is False  # still generating
    stopped = page.evaluate(STOP_AND_TIME, STOP)
    assert stopped["ms"] < 1000, stopped
    assert stopped["route"] == "comm", stopped  # handled on a kernel subshell, no interrupt
    output = generating.locator(".jp-OutputArea").inner_text()
    assert "finish: cancelled" in output or "interrupted" in output, output
    text = generating.locator(".jp-OutputArea-output").first.inner_text()
    assert len(text.strip()) > 20, text  # what was generated stays
    expect(status).not_to_contain_text("running", timeout=5_000)
    generating.screenshot(path=screenshots / "labextension-stopped.png")
    print(f"Stop generation: route={stopped['route']}, kernel idle after {stopped['ms']:.0f} ms")

    # The palette lists the command.
    page.keyboard.press("Escape")
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:activate-command-palette')")
    page.keyboard.type("Stop generation")
    expect(page.locator(".lm-CommandPalette-item", has_text="Stop generation").first).to_be_visible()
    page.keyboard.press("Escape")
