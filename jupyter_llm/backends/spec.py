"""What the registry knows about a built-in backend kind without importing its module: the
class to import when it loads, its one-line description, the packages it needs and the
command that installs them, and any check beyond installed packages."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jupyter_llm.backends.base import package_availability


def import_target(target: str) -> Any:
    """The object a "module:attribute" string names (raises ImportError, AttributeError)."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class BackendSpec:
    """One built-in kind, as the registry lists it."""

    target: str  # "module:Class", imported only when the kind loads
    description: str
    packages: tuple[str, ...]  # import names, looked up with find_spec (never imported here)
    install_hint: str  # the exact command that installs what is missing
    # "module:function" taking this spec and returning (ok, reason); it replaces the plain
    # package check, which it usually starts with. Its module must import nothing heavy.
    check: str | None = None

    def package_verdict(self) -> tuple[bool, str]:
        """(True, "") when every package is installed, else (False, "missing a, b: <install_hint>")."""
        return package_availability(self.install_hint, *self.packages)

    def availability(self) -> tuple[bool, str]:
        """(can load on this machine, why not), without importing the backend's module."""
        if self.check is None:
            return self.package_verdict()
        check: Callable[[BackendSpec], tuple[bool, str]] = import_target(self.check)
        return check(self)
