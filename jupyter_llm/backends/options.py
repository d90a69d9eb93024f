"""Backend options: the dataclass each backend extends, and how command-line words become its
values (`--key value`, `--key=value`, `--flag`, `--no-flag`), checked and coerced to the
declared types with an error that lists what the backend accepts; the memory sizes options take."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

from jupyter_llm.errors import ParamError


@dataclass
class BackendOptions:
    """Options common to every backend; each backend extends this dataclass with its own."""

    threads: int | None = None  # compute threads for this backend (default: all cores)

    @classmethod
    def parse(cls, options: dict[str, Any], backend: str) -> BackendOptions:
        """Check names and coerce values given as strings (from a magic line or the CLI)."""
        hints = typing.get_type_hints(cls)
        accepted = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(k for k in options if k not in hints)
        if unknown:
            names = ", ".join("--" + n.replace("_", "-") for n in accepted)
            shown = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise ParamError(f"unknown option(s) {shown} for backend {backend!r}; accepted: {names}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in options.items()})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a string (or a bare flag's True) into the option's declared type."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if value is None or not isinstance(value, str) or str in kinds:
        return value
    flag = "--" + name.replace("_", "-")
    for kind in kinds:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        elif kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ParamError(f"{flag} expects {expected}, got {value!r}")


def options_from_args(args: list[str]) -> dict[str, Any]:
    """Backend options from command-line words: --key value, --key=value, --flag, --no-flag."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) < 3:
            raise ParamError(f"unexpected argument {word!r}; backend options look like --name value")
        key, eq, value = word[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            options[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[key] = args[i + 1]
            i += 1
        elif key.startswith("no_"):
            options[key[3:]] = False
        else:
            options[key] = True
        i += 1
    return options


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_memory(value: float | str) -> int:
    """Bytes from 1073741824, "1GiB", "512MiB", "1.5G" (K/M/G alone are binary units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ParamError(f"--kv-cache-memory must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ParamError(f"--kv-cache-memory expects bytes or a size like 512MiB or 1GiB, got {value!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ParamError(f"--kv-cache-memory must be positive, got {value!r}")
    return size
