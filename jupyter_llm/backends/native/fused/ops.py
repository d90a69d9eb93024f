"""The fused CPU ops (decode_ops.cpp, block_ops.cpp, bindings.cpp): built once per torch build and
CPU level, loaded on demand.

`torch.utils.cpp_extension.load` compiles the source with the system's C++ compiler and ninja
into a folder of our build cache (beside the llama.cpp wheels; `JUPYTER_LLM_BUILDS` moves
it) keyed by the source, torch's version and the instruction
sets it is built for: the set-up builds it ahead (`python -m jupyter_llm.backends.native.fused.ops`),
a later load imports the built module in milliseconds. The flags name an instruction set that
both kinds of machines share (AVX2 + FMA + F16C) when the CPU has it, never -march=native, so a build
runs on the next CPU of its level. Without a compiler the engine keeps its eager path and
`unavailable_reason()` says why.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("bindings.cpp", "decode_ops.cpp", "block_ops.cpp")]
DISABLE_ENV = "JUPYTER_LLM_FUSED_OPS"  # "0" turns the fused ops off (the eager path runs)


def build_flags() -> list[str]:
    """-O3 and OpenMP (torch's parallel_for), plus AVX2/FMA/F16C when this CPU has them."""
    from jupyter_llm.cpu import cpu_info

    flags = ["-O3", "-fopenmp"]
    if cpu_info().has("avx2", "fma", "f16c"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def build_dir() -> Path:
    """The build folder: the source, torch's version and the flags decide it."""
    import torch

    base = os.environ.get("JUPYTER_LLM_BUILDS")
    root = Path(base).expanduser() if base else (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jupyter_llm" / "builds")
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES) + torch.__version__.encode()
                         + " ".join(build_flags()).encode())
    return root / "fused-ops" / key.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get(DISABLE_ENV) == "0":
        return None, f"{DISABLE_ENV}=0"
    try:
        from torch.utils.cpp_extension import load

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        module = load(name="jupyter_llm_decode_ops", sources=[str(source) for source in SOURCES],
                      extra_cflags=build_flags(),
                      extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
        return module, None
    except Exception as error:  # noqa: BLE001 (no compiler, no ninja, a failed build: the eager path serves)
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[-1] if lines else ''}"
        log.warning("fused decode ops unavailable (%s); the native engine runs its eager path", reason)
        return None, reason


def fused_ops() -> ModuleType | None:
    """The built extension module, or None when it cannot be built here."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the fused ops are off (None when they are on)."""
    return _load()[1]


if __name__ == "__main__":  # the set-up builds the ops ahead of the first load
    print("fused decode ops:", "ready" if fused_ops() is not None else f"unavailable ({unavailable_reason()})")
