"""Helpers for tests that load backends into the session-wide manager."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def load_keeping_default(manager: Any, *args: Any, **kwargs: Any) -> str:
    """Load a backend into the session manager without making it the default for other tests."""
    previous = manager.default
    info = manager.load(*args, **kwargs)
    if previous is not None:
        manager.use(previous)
    return info.name


@contextmanager
def manager_with(monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> Iterator[Any]:
    """A fresh EngineManager with the test backend `target` ("module:Class") registered and
    loaded as `name`; shut down on exit."""
    from jupyter_llm import backends
    from jupyter_llm.manager import EngineManager

    monkeypatch.setitem(backends.BUILTIN, name, target)
    fresh = EngineManager()
    try:
        fresh.load(name, progress=False)
        yield fresh
    finally:
        fresh.shutdown()
