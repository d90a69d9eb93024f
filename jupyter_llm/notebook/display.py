"""What the magics show: streaming text through display handles, tables, summaries.

Every mimebundle has a text/plain fallback (VS Code and nbconvert show it), and streamed
outputs carry provenance metadata (backend, model, sampling parameters).
"""
from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from jupyter_llm.schema import Completion, TokenEvent

MIME_META = "application/vnd.jupyter-llm+json"


def table_bundle(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                 title: str | None = None) -> dict[str, str]:
    """A table as an HTML + plain-text mimebundle."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ([title] if title else []) + [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in cells)
    caption = f"<caption>{html.escape(title)}</caption>" if title else ""
    return {"text/plain": "\n".join(lines),
            "text/html": f"<table class='jupyter-llm-table'>{caption}<thead><tr>{head}</tr></thead>"
                         f"<tbody>{body}</tbody></table>"}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def summary_line(completions: Sequence[Completion]) -> str:
    """One line: tokens, TTFT, tokens/s (and how the samples finished)."""
    tokens = sum(c.completion_tokens for c in completions)
    ttfts = [c.timings.ttft for c in completions if c.timings.ttft is not None]
    total = max((c.timings.total for c in completions), default=0.0)
    reasons = sorted({c.finish_reason for c in completions})
    parts = [f"{tokens} tokens"]
    if ttfts:
        parts.append(f"TTFT {min(ttfts) * 1000:.0f} ms")
    if total > 0 and tokens:
        parts.append(f"{tokens / total:.1f} tok/s")
    parts.append("finish: " + ", ".join(reasons))
    if len(completions) > 1:
        parts.insert(0, f"{len(completions)} outputs")
    return " · ".join(parts)


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
