"""Helpers for tests that load backends into the session-wide manager."""
from __future__ import annotations

from typing import Any


def load_keeping_default(manager: Any, *args: Any, **kwargs: Any) -> str:
    """Load a backend into the session manager without making it the default for other tests."""
    previous = manager.default
    info = manager.load(*args, **kwargs)
    if previous is not None:
        manager.use(previous)
    return info.name
