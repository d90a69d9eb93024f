"""The playground in a real JupyterLab: run the guide, then use the widget as a person would.

JLLM_SCREENSHOTS=docs .venv/bin/python -m pytest tests/browser  refreshes docs/playground*.png.
"""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.embedded]

NOTEBOOK = "02-sampling-playground.ipynb"
RUN_TIMEOUT = 300_000  # ms: the guide loads two backends and generates on a shared CPU

# window.jupyterapp exists because the server runs with --LabApp.expose_app_in_browser.
NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp?.shell.currentWidget;
  const kernel = panel?.sessionContext?.session?.kernel;
  if (!panel?.content || !kernel) return null;
  const cells = panel.content.widgets.filter((cell) => cell.model.type === "code");
  return {status: kernel.status, counts: cells.map((cell) => cell.model.executionCount)};
}"""


def notebook_state(page) -> dict | None:
    return page.evaluate(NOTEBOOK_STATE)


def run_all_cells(page) -> None:
    """Run the notebook and wait until every cell ran or one failed (which stops the run)."""
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(f"""() => {{
      const state = ({NOTEBOOK_STATE})();
      const failed = document.querySelector("[data-mime-type='application/vnd.jupyter.error']");
      return state && state.status === "idle" && (failed || state.counts.every((count) => count !== null));
    }}""", timeout=RUN_TIMEOUT, polling=500)
    errors = page.locator("[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()
    assert errors == [], errors


def set_number(widget, name: str, value: str) -> None:
    widget.locator(f".jllm-{name} input[type=number]").fill(value)


def test_playground_in_jupyterlab(embedded_model, jupyter_lab, page, screenshots):
    from playwright.sync_api import expect

    page.goto(jupyter_lab.open(NOTEBOOK))
    page.wait_for_function(f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.status === 'idle'; }}",
                           timeout=120_000, polling=500)
    run_all_cells(page)
    counts = notebook_state(page)["counts"]

    widget = page.locator(".jllm-playground").first
    widget.scroll_into_view_if_needed()
    expect(widget.locator(".jllm-compare")).to_have_value("native")  # the guide's last settings

    # Greedy on both backends, started with the keyboard shortcut.
    set_number(widget, "temperature", "0")
    set_number(widget, "max_tokens", "24")
    prompt = widget.locator(".jllm-prompt")
    prompt.fill("The capital of France is")
    prompt.press("Control+Enter")
    expect(widget.locator(".jllm-stopbutton")).to_be_enabled()
    columns = widget.locator(".jllm-col")
    expect(columns).to_have_count(2)
    expect(columns.nth(0).locator(".jllm-tok").first).to_be_visible(timeout=90_000)  # streamed in
    for i in range(2):
        expect(columns.nth(i).locator(".jllm-foot")).to_contain_text("finish: length", timeout=120_000)
    expect(columns.nth(0).locator(".jllm-text")).to_contain_text("Paris")
    assert columns.nth(0).locator(".jllm-text").inner_text() == columns.nth(1).locator(".jllm-text").inner_text()
    expect(columns.nth(0).locator(".jllm-foot")).to_contain_text("TTFT")
    expect(widget.locator(".jllm-generate")).to_be_enabled()
    assert notebook_state(page)["counts"] == counts  # Ctrl+Enter in the widget did not run the cell
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

    # Stop during a long generation of two samples: the backend stops, the text so far stays.
    widget.locator(".jllm-compare").select_option("")
    widget.locator(".jllm-ignore_eos").check()
    set_number(widget, "temperature", "0.8")
    set_number(widget, "max_tokens", "2000")
    set_number(widget, "n", "2")
    prompt.fill("Once upon a time, in a small village,")
    widget.locator(".jllm-generate").click()
    expect(columns).to_have_count(2)
    page.wait_for_function("() => document.querySelector('.jllm-playground .jllm-col')"
                           "?.querySelectorAll('.jllm-tok').length >= 10", timeout=90_000, polling=200)
    widget.locator(".jllm-stopbutton").click()
    for i in range(2):
        expect(columns.nth(i).locator(".jllm-foot")).to_contain_text("finish: cancelled", timeout=30_000)
        assert columns.nth(i).locator(".jllm-tok").count() < 2000
    expect(widget.locator(".jllm-generate")).to_be_enabled()
    widget.screenshot(path=screenshots / "playground-stopped.png")
