"""The backend registry: built-in kinds described by a `BackendSpec` (their modules are
imported only when the kind loads, so listing what can load here imports no engine) and
third-party backends from the entry-point group `jupyter_llm.backends`."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from jupyter_llm.backends.base import Backend, Capabilities
from jupyter_llm.backends.spec import BackendSpec, import_target
from jupyter_llm.errors import BackendError, BackendUnavailable

__all__ = [
    "BUILTIN",
    "SPECS",
    "Backend",
    "BackendError",
    "BackendSpec",
    "BackendUnavailable",
    "Capabilities",
    "available_backends",
    "backend_availability",
    "backend_class",
    "registered_kinds",
]

_GPU_CHECK = "jupyter_llm.backends.checks:gpu_engine_availability"

SPECS: dict[str, BackendSpec] = {
    "native": BackendSpec(
        "jupyter_llm.backends.native.backend:NativeBackend",
        "our PyTorch engine: paged KV cache, continuous batching, prefix cache (CPU or CUDA)",
        ("torch", "transformers", "safetensors"), "pip install torch transformers safetensors"),
    "hf": BackendSpec(
        "jupyter_llm.backends.hf:HFBackend", "Hugging Face transformers (CPU or CUDA)",
        ("torch", "transformers"), "pip install transformers accelerate gguf"),
    "llamacpp": BackendSpec(
        "jupyter_llm.backends.llamacpp.backend:LlamaCppBackend",
        "llama.cpp via llama-cpp-python: GGUF files on CPU, one sequence at a time",
        ("llama_cpp", "torch"), "pip install 'jupyter-llm[llamacpp]'",
        check="jupyter_llm.backends.checks:llamacpp_availability"),
    "openai": BackendSpec(
        "jupyter_llm.backends.openai.backend:OpenAIBackend",
        "any OpenAI-compatible server (vLLM, TensorRT-LLM, SGLang, llama.cpp, %llm_serve)",
        ("httpx",), "pip install httpx"),
    "vllm": BackendSpec(
        "jupyter_llm.backends.gpu.vllm:VLLMBackend",
        "vLLM in process (NVIDIA GPU): continuous batching, paged attention, tensor parallel",
        ("vllm", "torch"), "pip install 'jupyter-llm[vllm]'", check=_GPU_CHECK),
    "trtllm": BackendSpec(
        "jupyter_llm.backends.gpu.trtllm:TRTLLMBackend",
        "TensorRT-LLM in process (NVIDIA GPU): HF models or built engines, in-flight batching",
        ("tensorrt_llm", "torch"), "pip install 'jupyter-llm[trtllm]'", check=_GPU_CHECK),
    "onnx": BackendSpec(
        "jupyter_llm.backends.onnx.backend:ONNXBackend",
        "ONNX Runtime GenAI: HF models exported to fp32/int8/int4 ONNX, CPU or CUDA",
        ("onnxruntime_genai", "torch", "transformers"), "pip install 'jupyter-llm[onnx]'",
        check="jupyter_llm.backends.checks:onnx_availability"),
}

# kind -> "module:Class" of every built-in kind. A kind added here without a spec (as tests
# add a fake one) is treated like an entry-point backend: its class is imported and asked.
BUILTIN: dict[str, str] = {kind: spec.target for kind, spec in SPECS.items()}

ENTRY_POINT_GROUP = "jupyter_llm.backends"


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def registered_kinds() -> list[str]:
    return list(_targets())


def _unknown(kind: str, targets: dict[str, str]) -> BackendError:
    return BackendError(f"unknown backend {kind!r}; available: {', '.join(targets)}")


def backend_class(kind: str) -> type[Backend]:
    targets = _targets()
    if kind not in targets:
        raise _unknown(kind, targets)
    try:
        return import_target(targets[kind])
    except ImportError as error:
        raise BackendUnavailable(f"backend {kind!r} cannot be imported ({error})") from error


def _spec(kind: str) -> BackendSpec | None:
    """The spec of a built-in kind whose target is still the spec's (None for any other)."""
    spec = SPECS.get(kind)
    return spec if spec is not None and BUILTIN.get(kind) == spec.target else None


def backend_availability(kind: str) -> tuple[bool, str]:
    """(can `kind` load on this machine, why not): from its spec for a built-in kind, without
    importing its module; from the class's `availability()` for any other."""
    targets = _targets()
    if kind not in targets:
        raise _unknown(kind, targets)
    return _describe(kind)[:2]


def _describe(kind: str) -> tuple[bool, str, str]:
    """(available, why not, description) of a registered kind."""
    spec = _spec(kind)
    if spec is not None:
        return (*spec.availability(), spec.description)
    cls = backend_class(kind)
    return (*cls.availability(), cls.description)


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
            rows.append(BackendAvailability(kind, *_describe(kind)))
        except BackendError as error:
            rows.append(BackendAvailability(kind, False, str(error), ""))
    return rows
