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

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

NOTEBOOK = "labextension.ipynb"
STOP = "jupyter-llm:stop-generation"
STATUS = "#jupyter-llm-status"


def _notebook(model_dir: str) -> dict:
    def code(source: str) -> dict:
        return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}

    cells = [
        code("from pathlib import Path\n"
             "from tiny_models import tiny_llama_folder\n"
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


# Spans of the editor of cell `index`, with their classes (the syntax highlighting tokens).
TOKENS = """(index) => {
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[index];
  return [...cell.node.querySelectorAll('.cm-content .cm-line span')]
    .map((span) => ({text: span.textContent, cls: span.className}));
}"""

# Watches for the Stop generation shortcut: from its keydown, how long the kernel takes to be
# idle, and which route the command took (what its execute() returned). Read with STOP_RESULT.
WATCH_STOP = """(command) => {
  const app = window.jupyterapp;
  const kernel = app.shell.currentWidget.sessionContext.session.kernel;
  const watch = window.jllmStopWatch = {executed: []};
  app.commands.commandExecuted.connect((_, args) => {
    watch.executed.push(args.id);
    if (args.id === command) {
      Promise.resolve(args.result).then((route) => { watch.route = route; },
                                        (error) => { watch.route = `error: ${error}`; });
    }
  });
  document.addEventListener('keydown', (event) => {
    if (event.key !== 'Shift' && event.key !== 'Control' && watch.t0 === undefined) {
      watch.t0 = performance.now();
      watch.key = {key: event.key, code: event.code, target: event.target.className};
      const check = () => {
        if (kernel.status === 'idle') watch.ms = performance.now() - watch.t0;
        else setTimeout(check, 10);
      };
      check();
    }
  }, {capture: true});
}"""
STOP_RESULT = "() => window.jllmStopWatch"
STOP_DONE = "() => window.jllmStopWatch.ms !== undefined && window.jllmStopWatch.route !== undefined"
STOP_WITHIN_MS = 1500  # "about a second"; the docs measure ~60 ms on an idle machine
# The notebook's node has the focus (command mode), so the shortcut's selector .jp-Notebook matches.
FOCUS_NOTEBOOK = """() => {
  const notebook = window.jupyterapp.shell.currentWidget.content;
  notebook.mode = 'command';
  notebook.node.focus();
  return !!document.activeElement?.closest('.jp-Notebook');
}"""


def _rate(text: str) -> float:
    match = re.search(r"([\d.]+)(k?) tok/s", text)
    return 0.0 if not match else float(match.group(1)) * (1000 if match.group(2) else 1)


def test_labextension_in_jupyterlab(jupyter_lab, notebook, page, screenshots, tmp_path):
    from playwright.sync_api import expect

    listed = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                            text=True, timeout=60, check=False)
    if "jupyter-llm" not in listed.stdout + listed.stderr:
        pytest.skip("the labextension is not installed (bash scripts/setup.sh builds and links it)")
    assert re.search(r"jupyter-llm v[\d.]+ .*enabled", listed.stdout + listed.stderr)

    (jupyter_lab.root / NOTEBOOK).write_text(json.dumps(_notebook(str(tmp_path / "tiny-llama"))))
    notebook.open(NOTEBOOK)
    status = page.locator(STATUS)
    expect(status).to_be_hidden()  # jupyter_llm is not loaded yet: the status bar shows nothing

    # 1. Highlighting: the Python cell has a string token; the %%generate cell has none.
    notebook.wait(f"() => ({TOKENS})(1).some((t) => t.text.includes(\"'it'\"))",
                  "the Python cell highlighted with a string token", 30)
    string_class = next(t["cls"] for t in page.evaluate(TOKENS, 1) if "'it'" in t["text"])
    assert string_class
    cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
    expect(cell.locator(".cm-line.jllm-magic-line")).to_have_count(1)  # the magic line stays a magic
    expect(cell.locator(".cm-line.jllm-magic-line")).to_contain_text("%%generate --max-tokens 8")
    notebook.wait(f"(cls) => !({TOKENS})(2).some((t) => t.cls === cls)",
                  "the %%generate cell without Python string tokens", 10, arg=string_class, polling=100)
    tokens = page.evaluate(TOKENS, 2)
    assert not [t for t in tokens if t["cls"] == string_class], tokens
    assert not [t for t in tokens if "'" in t["text"] and t["cls"] == string_class]
    cell.screenshot(path=screenshots / "labextension-highlight.png")

    # 2. Status bar after %llm_backend.
    notebook.run(0, timeout=120)
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
    notebook.start(3)
    expect(status).to_contain_text("running", timeout=30_000)
    deadline = time.monotonic() + 30
    while _rate(status.inner_text()) <= 0 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert _rate(status.inner_text()) > 0, status.inner_text()
    generating = page.locator(".jp-Notebook .jp-Cell").nth(3)
    expect(generating.locator(".jp-OutputArea-output").first).not_to_be_empty()
    page.wait_for_timeout(1500)  # let it stream a while
    page.locator("#jp-main-statusbar").screenshot(path=screenshots / "labextension-statusbar.png")

    # 4. Stop generation with its keyboard shortcut (issue #8): the generation ends within about a
    # second, over the comm (no kernel interrupt), and the cell keeps what was generated.
    bindings = page.evaluate(f"() => window.jupyterapp.commands.keyBindings"
                             f".filter((b) => b.command === '{STOP}').map((b) => b.keys.join(' '))")
    assert bindings == ["Ctrl Shift ."], bindings  # `Accel Shift .` in labextension/src/index.ts, on Linux
    assert page.evaluate(f"() => window.jupyterapp.commands.label('{STOP}')") == "Stop generation"
    assert notebook.state()["status"] == "busy", "the generation ended before Stop generation"
    page.evaluate(WATCH_STOP, STOP)
    assert page.evaluate(FOCUS_NOTEBOOK), "the notebook does not have the focus"
    page.keyboard.press("Control+Shift+Period")  # Accel is Control on Linux
    notebook.wait(STOP_DONE, "Stop generation (Ctrl+Shift+.) ending the generation", 10, polling=50)
    stopped = page.evaluate(STOP_RESULT)
    assert STOP in stopped["executed"], stopped  # the shortcut ran the command
    assert stopped["route"] == "comm", stopped  # handled on a kernel subshell, no interrupt
    assert stopped["ms"] < STOP_WITHIN_MS, stopped
    output = generating.locator(".jp-OutputArea").inner_text()
    assert "finish: cancelled" in output or "interrupted" in output, output
    text = generating.locator(".jp-OutputArea-output").first.inner_text()
    assert len(text.strip()) > 20, text  # what was generated stays
    expect(status).not_to_contain_text("running", timeout=5_000)
    generating.screenshot(path=screenshots / "labextension-stopped.png")
    print(f"Stop generation (keyboard): route={stopped['route']}, kernel idle after {stopped['ms']:.0f} ms")

    # The palette lists the command.
    page.keyboard.press("Escape")
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:activate-command-palette')")
    page.keyboard.type("Stop generation")
    expect(page.locator(".lm-CommandPalette-item", has_text="Stop generation").first).to_be_visible()
    page.keyboard.press("Escape")

    for name in ("labextension-highlight.png", "labextension-statusbar.png", "labextension-stopped.png"):
        assert (screenshots / name).stat().st_size > 1000, name
