"""Where a model runs and in what precision: device and dtype names checked and resolved; the
heap memory a load freed handed back to the OS; the memory still available on a device."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from pathlib import Path

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


def available_memory(device: str) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory, or on the CPU what the
    OS could hand out (MemAvailable), within the container's limit where one is set (cgroup v2)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    return max(0, available)
