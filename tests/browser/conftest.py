"""JupyterLab started on loopback (a free port, a token, a temporary root holding copies of
the notebooks) and Debian's Chromium driven headless by Playwright. Never downloads a browser.

Every test leaves the server as it found it: its pages are closed and every kernel is shut down
(a kernel still generating would starve the next test of CPU). Every wait has a timeout and
fails with what the notebook was doing."""
from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paths import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# JupyterLab settings for a quiet, offline test session: no news or update prompts over the page.
LAB_SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                {"fetchNews": "false", "checkForUpdates": False}}
ERROR_OUTPUT = "[data-mime-type='application/vnd.jupyter.error']"

# window.jupyterapp exists because the server runs with --LabApp.expose_app_in_browser.
NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp?.shell.currentWidget;
  const kernel = panel?.sessionContext?.session?.kernel;
  if (!panel?.content || !kernel) return null;
  const cells = panel.content.widgets;
  return {path: panel.context.path, status: kernel.status,
          counts: cells.map((cell) => cell.model.type === 'code' ? cell.model.executionCount : undefined)};
}"""
KERNEL_IDLE = f"() => ({NOTEBOOK_STATE})()?.status === 'idle'"
# Runs cell `index` of the current notebook (command mode, the cell stays selected); returns at once.
RUN_CELL = """(index) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  panel.content.widgets[index].model.executionCount = null;  // CELL_DONE waits for the new count
  panel.content.activeCellIndex = index;
  panel.content.mode = 'command';
  void app.commands.execute('notebook:run-cell');
}"""
CELL_DONE = f"""(index) => {{
  const state = ({NOTEBOOK_STATE})();
  return !!state && state.counts[index] !== null && state.status === 'idle';
}}"""
CODE_SOURCES = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .map((cell) => cell.model.type === 'code' ? cell.model.sharedModel.source : null)"""


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path
    _workspaces: itertools.count = field(default_factory=itertools.count)

    def open(self, path: str) -> str:
        # A fresh workspace per page: the layout of an earlier test (its notebooks) is not restored.
        return f"{self.url}/lab/workspaces/test-{next(self._workspaces)}/tree/{path}?token={self.token}"

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict]:
        return self.api("GET", "kernels")

    def shutdown_kernels(self, timeout: float = 60) -> list[dict]:
        """Deletes every session and kernel of the server; returns the kernels that were running."""
        kernels = self.kernels()
        for session in self.api("GET", "sessions"):
            _ignore_gone(lambda session=session: self.api("DELETE", f"sessions/{session['id']}"))
        for kernel in self.kernels():
            _ignore_gone(lambda kernel=kernel: self.api("DELETE", f"kernels/{kernel['id']}"))
        deadline = time.monotonic() + timeout
        while (left := self.kernels()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"kernels still running {timeout} s after their shutdown: {left}"
        return kernels

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _ignore_gone(call) -> None:
    try:
        call()
    except urllib.error.HTTPError as error:
        if error.code != 404:  # already gone (its session went first)
            raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def jupyter_lab(tmp_path_factory) -> Lab:
    pytest.importorskip("jupyterlab")
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "root"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns("build", ".ipynb_checkpoints"))
    settings = base / "settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               PYTHONPATH=str(ROOT / "tests" / "helpers"))  # kernels import the test helpers
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", "--allow-root"]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{url}/api/status?token={token}", process, log)
        yield Lab(url, token, root, log)
    finally:
        process.terminate()  # the server shuts its kernels down on the way out
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(autouse=True)
def _no_kernels_left(jupyter_lab):
    """Each test starts and ends with no kernel on the server. Runs its teardown after `page`'s,
    so the notebook pages are closed before their kernels go (no "kernel died" dialogs)."""
    jupyter_lab.shutdown_kernels()
    yield
    left = jupyter_lab.shutdown_kernels()
    busy = [k for k in left if k.get("execution_state") == "busy"]
    if busy:
        warnings.warn(f"shut down {len(busy)} kernel(s) still busy after the test: {busy}", stacklevel=1)


# Module scope: Playwright's sync API runs an event loop in the main thread while it is open,
# which would break asyncio.run() in every test collected after the browser tests.
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        for open_page in context.pages:
            open_page.close(run_before_unload=False)
        context.close()


@pytest.fixture
def notebook(jupyter_lab, page):
    """Opens notebooks in `page` and runs their cells, with timeouts that say what was going on."""
    return Notebook(jupyter_lab, page)


class Notebook:
    def __init__(self, lab: Lab, page):
        self.lab, self.page = lab, page

    def state(self) -> dict | None:
        return self.page.evaluate(NOTEBOOK_STATE)

    def errors(self) -> list[str]:
        return self.page.locator(ERROR_OUTPUT).all_inner_texts()

    def wait(self, expression: str, what: str, timeout: float, arg=None, polling: int = 200,
             show: str | None = None) -> None:
        """page.wait_for_function, failing with `what`, the notebook's state and what the JavaScript
        expression `show` returns (e.g. the widget's state) instead of a bare timeout."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000, polling=polling)
            return
        except PlaywrightTimeout:
            pass
        shown = f"\nshown: {self._describe(lambda: self.page.evaluate(show))}" if show else ""
        pytest.fail(f"{what}: not within {timeout:g} s{shown}\nnotebook: {self._describe(self._notebook)}\n"
                    f"JupyterLab log:\n{self.lab.log_tail(1500)}")

    def _notebook(self) -> str:
        return f"{self.state()}, errors: {self.errors()}, kernels: {self.lab.kernels()}"

    @staticmethod
    def _describe(read) -> str:
        try:
            return str(read())
        except Exception as error:  # noqa: BLE001  (the description of a failure must not fail)
            return f"(could not read it: {error!r})"

    def open(self, path: str, timeout: float = 90) -> None:
        self.page.goto(self.lab.open(path))
        self.wait(KERNEL_IDLE, f"opening {path} with an idle kernel", timeout)

    def index(self, text: str) -> int:
        """The index of the first code cell whose source contains `text`."""
        sources = self.page.evaluate(CODE_SOURCES)
        found = [i for i, source in enumerate(sources) if source is not None and text in source]
        assert found, f"no code cell contains {text!r}: {sources}"
        return found[0]

    def run(self, index: int, timeout: float = 60) -> None:
        """Runs cell `index`, waits until it finished, and fails on an error output."""
        self.page.evaluate(RUN_CELL, index)
        self.wait(CELL_DONE, f"running cell {index}", timeout, arg=index)
        errors = self.errors()
        assert errors == [], f"cell {index} failed: {errors}"

    def start(self, index: int) -> None:
        """Runs cell `index` without waiting for it."""
        self.page.evaluate(RUN_CELL, index)


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where screenshots go: $JLLM_SCREENSHOTS (relative to the repository, e.g. `docs`), else a temp folder."""
    target = os.environ.get("JLLM_SCREENSHOTS")
    folder = (ROOT / target) if target else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder
