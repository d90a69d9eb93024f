"""Where a model runs and in what precision: device and dtype names checked and resolved."""
from __future__ import annotations

from typing import Any

from jupyter_llm.errors import BackendError, ParamError

DTYPES = ("float32", "bfloat16", "float16")  # what transformers backends accept


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when there is a GPU; 'cuda' without one is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("--device cuda was asked for, but no CUDA GPU is visible to torch; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ParamError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N")
    return device


def torch_dtype(name: str, accepted: tuple[str, ...] = DTYPES) -> Any:
    """The torch dtype named `name`, if it is one of `accepted`."""
    import torch

    if name not in accepted:
        raise ParamError(f"unknown dtype {name!r}; accepted: {', '.join(accepted)}")
    return getattr(torch, name)
