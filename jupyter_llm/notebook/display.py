"""What the magics show: streaming text through display handles, tables, summaries.

Every mimebundle has a text/plain fallback (VS Code and nbconvert show it), and streamed
outputs carry provenance metadata (backend, model, sampling parameters). An answer renders in
one of FORMATS (`answer_bundle`): text, Markdown, a code block, or pretty-printed JSON.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from jupyter_llm.schema import Completion, TokenEvent
from jupyter_llm.structured import StructuredOutput

MIME_META = "application/vnd.jupyter-llm+json"
FORMATS = ("text", "markdown", "code", "json")
Key = tuple[int, int]  # (prompt index, sample index)
_NOT_JSON = object()


def default_format(structured: StructuredOutput | None) -> str:
    """JSON for a JSON-constrained answer, else text."""
    return "json" if structured is not None and structured.is_json else "text"


def answer_bundle(text: str, fmt: str = "text", label: Key | None = None, final: bool = True) -> dict[str, str]:
    """One answer as a mimebundle in `fmt`, with its plain text as the text/plain fallback.
    JSON renders pretty-printed once `final` and only if the answer parses (else it is text,
    as while it streams); `label` names the prompt and sample in a batch."""
    plain = f"[prompt {label[0]}, sample {label[1]}] " if label else ""
    heading = f"**[prompt {label[0]}, sample {label[1]}]**\n\n" if label else ""
    if fmt == "json":
        value = _json_value(text) if final else _NOT_JSON
        if value is _NOT_JSON:
            return {"text/plain": plain + text}
        pretty = json.dumps(value, indent=2, ensure_ascii=False)
        return {"text/markdown": heading + _fence(pretty, "json"), "text/plain": plain + pretty}
    if fmt == "markdown":
        return {"text/markdown": heading + text, "text/plain": plain + text}
    if fmt == "code":
        return {"text/markdown": heading + _fence(text), "text/plain": plain + text}
    return {"text/plain": plain + text}



def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def _fence(text: str, language: str = "") -> str:
    """A fenced code block longer than any run of backticks inside it."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}{language}\n{text}\n{ticks}"


class StreamView:
    """One live output area per (prompt, sample), updated at most `max_rate` times a second
    (Jupyter drops output above its rate limit)."""

    def __init__(self, keys: Sequence[Key], metadata: dict[str, Any], max_rate: float = 20.0,
                 labels: bool = False, fmt: str = "text"):
        from IPython.display import display

        self.metadata = metadata
        self.interval = 1.0 / max_rate
        self.labels = labels
        self.fmt = fmt
        self.final = False
        self.texts = {key: "" for key in keys}
        self.dirty: set[Key] = set()
        self.last_flush = 0.0
        self.handles = {key: display(self._bundle(key), metadata=self._meta(key), display_id=True, raw=True)
                        for key in keys}

    def _bundle(self, key: Key) -> dict[str, str]:
        return answer_bundle(self.texts[key], self.fmt, key if self.labels else None, final=self.final)

    def _meta(self, key: Key) -> dict[str, Any]:
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
        """The answers as they ended, in their final rendering (JSON replaces the raw tokens)."""
        self.final = True
        for c in completions:
            key = (c.prompt_index, c.index)
            if key in self.texts and (self.texts[key] != c.text or self.fmt == "json"):
                self.texts[key] = c.text
                self.dirty.add(key)
        self.flush()


def show_completions(completions: Sequence[Completion], metadata: dict[str, Any], fmt: str = "text") -> None:
    """The whole answers at once (--no-stream)."""
    from IPython.display import display

    labels = len(completions) > 1
    for c in completions:
        key = (c.prompt_index, c.index)
        display(answer_bundle(c.text, fmt, key if labels else None), raw=True,
                metadata={MIME_META: {**metadata, "prompt_index": c.prompt_index, "sample_index": c.index}})
