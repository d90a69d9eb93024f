"""`{name}` interpolation for prompts that may contain code.

str.format breaks prompts with braces (jupyter-ai #27, #967): here a `{name}` (or
`{name.attr}`) is replaced only when the name exists in the namespace, any other brace
stays as written, and `{{` / `}}` escape to a literal brace.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PATTERN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_MISSING = object()


def lookup(path: str, namespace: Mapping[str, Any]) -> Any:
    """The value of `name` or `name.attr.attr` in the namespace, or _MISSING."""
    head, *attrs = path.split(".")
    value = namespace.get(head, _MISSING)
    for attr in attrs:
        if value is _MISSING:
            break
        value = getattr(value, attr, _MISSING)
    return value


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        value = lookup(match.group(1), namespace)
        return token if value is _MISSING else str(value)

    return _PATTERN.sub(replace, text)


def whole_variable(text: str, namespace: Mapping[str, Any]) -> Any:
    """If `text` is exactly one `{name}` that exists, its value (e.g. a chat history list); else None."""
    match = _PATTERN.fullmatch(text.strip())
    if match and match.group(1):
        value = lookup(match.group(1), namespace)
        return None if value is _MISSING else value
    return None
