"""What the magics show: streaming text through display handles, tables, summaries.

Every mimebundle has a text/plain fallback (VS Code and nbconvert show it), and streamed
outputs carry provenance metadata (backend, model, sampling parameters).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from jupyter_llm.schema import Completion, TokenEvent

MIME_META = "application/vnd.jupyter-llm+json"


class StreamView:
    """One live output area per (prompt, sample), updated at most `max_rate` times a second
    (Jupyter drops output above its rate limit)."""

    def __init__(self, keys: Sequence[tuple[int, int]], metadata: dict[str, Any], max_rate: float = 20.0,
                 labels: bool = False):
        from IPython.display import display

        self.metadata = metadata
        self.interval = 1.0 / max_rate
        self.labels = labels
        self.texts = {key: "" for key in keys}
        self.dirty: set[tuple[int, int]] = set()
        self.last_flush = 0.0
        self.handles = {key: display(self._bundle(key), metadata=self._meta(key), display_id=True, raw=True)
                        for key in keys}

    def _label(self, key: tuple[int, int]) -> str:
        return f"[prompt {key[0]}, sample {key[1]}] " if self.labels else ""

    def _bundle(self, key: tuple[int, int]) -> dict[str, str]:
        return {"text/plain": self._label(key) + self.texts[key]}

    def _meta(self, key: tuple[int, int]) -> dict[str, Any]:
        return {MIME_META: {**self.metadata, "prompt_index": key[0], "sample_index": key[1]}}

    def add(self, event: TokenEvent) -> None:
        key = (event.prompt_index, event.index)
        if event.text:
            self.texts[key] += event.text
            self.dirty.add(key)
        now = time.monotonic()
        if now - self.last_flush >= self.interval:
            self.flush()

    def flush(self) -> None:
        for key in self.dirty:
            self.handles[key].update(self._bundle(key), metadata=self._meta(key), raw=True)
        self.dirty.clear()
        self.last_flush = time.monotonic()

    def finish(self, completions: Sequence[Completion]) -> None:
        for c in completions:
            key = (c.prompt_index, c.index)
            if key in self.texts and self.texts[key] != c.text:
                self.texts[key] = c.text
                self.dirty.add(key)
        self.flush()


def show_completions(completions: Sequence[Completion], metadata: dict[str, Any]) -> None:
    """The whole answers at once (--no-stream)."""
    from IPython.display import display

    labels = len(completions) > 1
    for c in completions:
        label = f"[prompt {c.prompt_index}, sample {c.index}] " if labels else ""
        display({"text/plain": label + c.text}, raw=True,
                metadata={MIME_META: {**metadata, "prompt_index": c.prompt_index, "sample_index": c.index}})
