"""What every front end shows as text: tables as mimebundles (HTML and a text/plain fallback),
the loaded backends' rows, the one-line summary of completions. Used by the magics, the CLI,
the benchmark's result and the JupyterLab status panel."""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from jupyter_llm.schema import Completion


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


def kind_rows(kinds: Sequence[Any]) -> list[dict[str, Any]]:
    """The backend kinds (`available_backends()`) as `%llm_backend --list` shows them."""
    return [{"backend": b.kind, "loadable": "yes" if b.available else "no", "why not": b.reason,
             "description": b.description} for b in kinds]


def backend_rows(manager: Any) -> list[dict[str, Any]]:
    """The loaded backends as the `%llm_backend` table shows them (and the status panel lists
    them), JSON-able: one row per `manager.backends()` entry."""
    return [{"name": b.name, "backend": b.backend, "model": b.model, "device": b.device, "dtype": b.dtype,
             "default": bool(b.default), "state": b.state, "running": b.running, "waiting": b.waiting,
             "tokens/s": b.tokens_per_s, "batching": b.batching,
             "details": ", ".join(f"{k}={v}" for k, v in b.extra.items())} for b in manager.backends()]


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
