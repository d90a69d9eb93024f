"""The playground in a real JupyterLab: open the guide, run the cells that make the widget, then
use the widget as a person would (issue #7): greedy settings and a prompt, Generate, the text
streams in, hover a token for its alternatives, Stop a long generation; screenshots of each.

JLLM_SCREENSHOTS=docs .venv/bin/python -m pytest tests/browser  refreshes docs/playground*.png.
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.embedded, pytest.mark.timeout(300)]

NOTEBOOK = "02-sampling-playground.ipynb"
# The guide's cells this test needs, in the order it runs them: both backends are loaded before the
# widget is made, so both are in its pickers. The rest of the guide runs in tests/integration.
SETUP_CELLS = ("%load_ext jupyter_llm", "%llm_backend hf", "%llm_backend native", "jl.Playground(")
LOAD_TIMEOUT = 150  # s per cell: the first load of the embedded model converts it (~20 s on 2 idle cores)

# Marks the columns on show as old: a new run replaces them, so COLUMNS_STREAMING only sees the new run.
MARK_COLUMNS_OLD = """() => document.querySelectorAll('.jllm-playground .jllm-col')
  .forEach((col) => { col.dataset.old = 'true'; })"""
# The new run shows one column per label, whose head contains it, each with at least `min` tokens.
COLUMNS_STREAMING = """([labels, min]) => {
  const cols = [...document.querySelectorAll('.jllm-playground .jllm-col')];
  return cols.length === labels.length && cols.every((col, i) => !col.dataset.old
    && col.querySelector('.jllm-col-head').textContent.includes(labels[i])
    && col.querySelectorAll('.jllm-tok').length >= min);
}"""

# What the widget shows, for failure messages.
WIDGET_STATE = """() => {
  const root = document.querySelector('.jllm-playground');
  if (!root) return null;
  const text = (selector) => root.querySelector(selector)?.textContent;
  return {status: text('.jllm-status'), error: text('.jllm-error'),
          running: root.classList.contains('jllm-running'), prompt: root.querySelector('.jllm-prompt').value,
          columns: [...root.querySelectorAll('.jllm-col')].map((col) => ({
            old: !!col.dataset.old, head: col.querySelector('.jllm-col-head').textContent,
            tokens: col.querySelectorAll('.jllm-tok').length, foot: col.querySelector('.jllm-foot').textContent}))};
}"""


def set_number(widget, name: str, value: str) -> None:
    widget.locator(f".jllm-{name} input[type=number]").fill(value)


def test_playground_in_jupyterlab(embedded_model, notebook, page, screenshots):
    from playwright.sync_api import expect

    notebook.open(NOTEBOOK)
    for text in SETUP_CELLS:
        notebook.run(notebook.index(text), timeout=LOAD_TIMEOUT)
    counts = notebook.state()["counts"]

    widget = page.locator(".jllm-playground").first
    expect(widget).to_be_visible(timeout=30_000)
    widget.scroll_into_view_if_needed()
    expect(widget.locator(".jllm-backend option")).to_have_count(2)  # hf and native
    widget.locator(".jllm-backend").select_option("hf")
    widget.locator(".jllm-compare").select_option("native")

    # Greedy on both backends: click Generate, the tokens stream into two columns.
    set_number(widget, "temperature", "0")
    set_number(widget, "max_tokens", "24")
    prompt = widget.locator(".jllm-prompt")
    prompt.fill("The capital of France is")
    page.evaluate(MARK_COLUMNS_OLD)
    widget.locator(".jllm-generate").click()
    columns = widget.locator(".jllm-col")
    notebook.wait(COLUMNS_STREAMING, "the first tokens streaming into the hf and native columns", 60,
                  arg=[["hf", "native"], 1], polling=100, show=WIDGET_STATE)
    for i in range(2):
        expect(columns.nth(i).locator(".jllm-foot")).to_contain_text("finish: length", timeout=60_000)
    expect(columns.nth(0).locator(".jllm-text")).to_contain_text("Paris")
    assert columns.nth(0).locator(".jllm-text").inner_text() == columns.nth(1).locator(".jllm-text").inner_text()
    expect(columns.nth(0).locator(".jllm-foot")).to_contain_text("TTFT")
    expect(widget.locator(".jllm-generate")).to_be_enabled()
    expect(widget.locator(".jllm-stopbutton")).to_be_disabled()
    widget.screenshot(path=screenshots / "playground.png")

    # Hovering a token shows its alternatives with probabilities.
    token = columns.nth(0).locator(".jllm-tok").nth(1)
    token.hover()
    tip = widget.locator(".jllm-tip")
    expect(tip).to_be_visible()
    expect(tip.locator(".jllm-alt")).to_have_count(5)
    expect(tip).to_contain_text("%")
    widget.screenshot(path=screenshots / "playground-alternatives.png")
    page.mouse.move(0, 0)
    expect(tip).to_be_hidden()

    # A setting out of range is a message in the widget, not a broken widget.
    set_number(widget, "top_p", "0")
    expect(widget.locator(".jllm-error")).to_contain_text("top_p must be in (0, 1]")
    set_number(widget, "top_p", "0.95")
    expect(widget.locator(".jllm-error")).to_be_hidden()

    # Stop during a long generation of two samples (started with Ctrl+Enter in the prompt):
    # the backend stops, the text so far stays.
    widget.locator(".jllm-compare").select_option("")
    widget.locator(".jllm-ignore_eos").check()
    set_number(widget, "temperature", "0.8")
    set_number(widget, "max_tokens", "2000")
    set_number(widget, "n", "2")
    prompt.fill("Once upon a time, in a small village,")
    page.evaluate(MARK_COLUMNS_OLD)
    prompt.press("Control+Enter")
    notebook.wait(COLUMNS_STREAMING, "two samples streaming at least 10 tokens each", 60,
                  arg=[["hf · sample 1", "hf · sample 2"], 10], polling=100, show=WIDGET_STATE)
    stop = widget.locator(".jllm-stopbutton")
    expect(stop).to_be_enabled()
    stop.click()
    for i in range(2):
        expect(columns.nth(i).locator(".jllm-foot")).to_contain_text("finish: cancelled", timeout=15_000)
        assert 10 <= columns.nth(i).locator(".jllm-tok").count() < 2000
    expect(widget.locator(".jllm-generate")).to_be_enabled()
    expect(stop).to_be_disabled()
    assert notebook.state()["counts"] == counts  # Ctrl+Enter in the widget did not run the cell
    widget.screenshot(path=screenshots / "playground-stopped.png")

    for name in ("playground.png", "playground-alternatives.png", "playground-stopped.png"):
        assert (screenshots / name).stat().st_size > 1000, name
