"""Progress bars: tqdm's text bar in a terminal; in a notebook kernel, one display (an HTML
<progress> beside its text line) updated in place and left in its final state.

Not tqdm's widget there: a widget's text/plain fallback is its state when first shown, so an
executed notebook kept "0%" in every frontend without the widget state (nbconvert, GitHub,
VS Code). Display updates rewrite the stored output itself. For the same reason transformers'
own bars (its "Loading weights" widget) are off while one of ours runs in a kernel.
"""
from __future__ import annotations

import contextlib
import html
import sys
import time
from collections.abc import Iterator

_TEXT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


class NotebookBar:
    """A progress display that shows `n` of `total` steps, refreshed at most every `interval`
    seconds while it runs and once more when it closes."""

    def __init__(self, description: str, total: int, interval: float = 0.2):
        from IPython.display import display

        self.description, self.total, self.interval = description, total, interval
        self.n = 0
        self.started = self.shown = time.monotonic()
        self.handle = display(self.bundle(), raw=True, display_id=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.shown >= self.interval:
            self.refresh()

    def refresh(self) -> None:
        self.shown = time.monotonic()
        self.handle.update(self.bundle(), raw=True)

    def bundle(self) -> dict[str, str]:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.started
        plain = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.description)
        line = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.description, bar_format=_TEXT)
        meter = f"<progress value='{self.n}' max='{self.total}'></progress>"
        return {"text/plain": plain, "text/html": f"{meter} <code>{html.escape(line)}</code>"}


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (tqdm.auto's test)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


@contextlib.contextmanager
def steps(enabled: bool, description: str, total: int) -> Iterator[object]:
    """A bar over `total` coarse steps (`.update(n)`), or a silent stand-in."""
    if not enabled:
        yield _Silent()
    elif in_notebook():
        bar = NotebookBar(description, total)
        try:
            with _transformers_bars_off():
                yield bar
        finally:
            bar.refresh()
    else:
        from tqdm import tqdm

        with tqdm(total=total, desc=description, leave=False) as bar:
            yield bar


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    logging = sys.modules.get("transformers.utils.logging")  # never imported here: only if loaded
    if logging is None or not logging.is_progress_bar_enabled():
        yield
        return
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.enable_progress_bar()
