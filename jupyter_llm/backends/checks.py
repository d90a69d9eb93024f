"""The availability checks of built-in kinds that need more than installed packages, named by
their `BackendSpec.check`. Listing backends calls them, so this module imports nothing heavy
at the top; each imports an engine only once its package is known to be installed."""
from __future__ import annotations

from jupyter_llm.backends.base import missing_packages
from jupyter_llm.backends.llamacpp.probe import probe
from jupyter_llm.backends.spec import BackendSpec


def llamacpp_availability(spec: BackendSpec) -> tuple[bool, str]:
    """The packages, then whether this llama.cpp build evaluates tokens on this CPU."""
    ok, reason = spec.package_verdict()
    if not ok:
        return ok, reason
    verdict = probe()  # in a subprocess, before llama.cpp is ever loaded in this one
    return verdict.ok, verdict.reason


def onnx_availability(spec: BackendSpec) -> tuple[bool, str]:
    """The packages, then whether the installed onnxruntime-genai has the generator API we drive."""
    ok, reason = spec.package_verdict()
    if not ok:
        return ok, reason
    import onnxruntime_genai as og  # installed (checked above); its attributes tell its API

    needed = ("append_tokens", "get_logits", "set_logits")
    if not all(hasattr(og.Generator, name) for name in needed) or not hasattr(og.Config, "overlay"):
        return False, (f"onnxruntime-genai {og.__version__} is too old (no Generator.set_logits): "
                       "pip install -U onnxruntime-genai")
    return True, ""


def cuda_reason() -> tuple[bool, str]:
    """(True, "") when torch sees a CUDA GPU, else why not, in one line."""
    import torch  # asked only once a GPU engine is installed: listing imports no torch otherwise

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as error:  # noqa: BLE001 a broken driver: one line, not a CUDA traceback
        return False, f"CUDA is not usable here ({type(error).__name__}: {error})"
    return (True, "") if count else (False, "no NVIDIA GPU is visible (torch.cuda.is_available() is False)")


def gpu_engine_availability(spec: BackendSpec) -> tuple[bool, str]:
    """The engine's package (spec.packages[0]), torch, then a CUDA GPU; each failure in one line."""
    engine = spec.packages[0]
    if missing_packages(engine):
        return False, f"the {engine} package is not installed: {spec.install_hint}"
    if missing_packages("torch"):
        return False, f"torch is not installed ({engine} needs it): {spec.install_hint}"
    return cuda_reason()
