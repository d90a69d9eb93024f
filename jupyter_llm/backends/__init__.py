"""The backend registry: built-in kinds by module path (imported only when used) and
third-party backends from the entry-point group `jupyter_llm.backends`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from jupyter_llm.backends.base import Backend, Capabilities
from jupyter_llm.errors import BackendError, BackendUnavailable

__all__ = [
    "BUILTIN",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Capabilities",
    "available_backends",
    "backend_class",
    "registered_kinds",
]

# kind -> "module:Class"; modules are imported only when the kind is used.
BUILTIN: dict[str, str] = {
    "native": "jupyter_llm.backends.native.backend:NativeBackend",
    "hf": "jupyter_llm.backends.hf:HFBackend",
    "llamacpp": "jupyter_llm.backends.llamacpp.backend:LlamaCppBackend",
    "openai": "jupyter_llm.backends.openai.backend:OpenAIBackend",
    "vllm": "jupyter_llm.backends.gpu.vllm:VLLMBackend",
    "trtllm": "jupyter_llm.backends.gpu.trtllm:TRTLLMBackend",
    "onnx": "jupyter_llm.backends.onnx.backend:ONNXBackend",
}

ENTRY_POINT_GROUP = "jupyter_llm.backends"


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def registered_kinds() -> list[str]:
    return list(_targets())


def backend_class(kind: str) -> type[Backend]:
    targets = _targets()
    if kind not in targets:
        raise BackendError(f"unknown backend {kind!r}; available: {', '.join(targets)}")
    module_name, _, attr = targets[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BackendUnavailable(f"backend {kind!r} cannot be imported ({error})") from error
    return getattr(module, attr)


@dataclass
class BackendAvailability:
    kind: str
    available: bool
    reason: str
    description: str


def available_backends() -> list[BackendAvailability]:
    """Every registered backend kind, whether it can load here and, if not, why."""
    rows = []
    for kind in _targets():
        try:
            cls = backend_class(kind)
            ok, reason = cls.availability()
            rows.append(BackendAvailability(kind, ok, reason, cls.description))
        except BackendError as error:
            rows.append(BackendAvailability(kind, False, str(error), ""))
    return rows
