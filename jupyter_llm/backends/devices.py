"""Where a model runs and in what precision: device and dtype names checked and resolved; the
heap memory a load freed handed back to the OS."""
from __future__ import annotations

import ctypes
import gc
import sys

import torch

from jupyter_llm.errors import BackendError, ParamError

DTYPES = ("float32", "bfloat16", "float16")  # what transformers backends accept


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when there is a GPU; 'cuda' without one is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("--device cuda was asked for, but no CUDA GPU is visible to torch; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ParamError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N")
    return device


def torch_dtype(name: str, accepted: tuple[str, ...] = DTYPES) -> torch.dtype:
    """The torch dtype named `name`, if it is one of `accepted`."""
    if name not in accepted:
        raise ParamError(f"unknown dtype {name!r}; accepted: {', '.join(accepted)}")
    return getattr(torch, name)


def release_free_memory() -> None:
    """Give the heap memory freed while loading (float32 copies of weights that were fused or
    quantized) back to the OS, so that resident memory reflects what the engine holds.
    glibc keeps freed large blocks in its heap otherwise; elsewhere this does nothing."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl...)
            pass
