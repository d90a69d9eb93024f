"""What a saved run was measured on: the CPU and its instruction sets, threads, builds.

Every saved benchmark result carries this, and every printed table names the CPU: these
machines change from one day to the next, and figures from two CPUs are never one ratio.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from jupyter_llm.cpu import cpu_info

_PACKAGES = ("jupyter-llm", "torch", "transformers", "llama-cpp-python", "onnxruntime-genai", "vllm", "tensorrt-llm")


def isa_flags() -> dict[str, bool]:
    """The instruction sets that decide which kernels run, as yes/no."""
    cpu = cpu_info()
    return {"avx2": cpu.has("avx2"), "avx512": cpu.has("avx512f"), "avx512_bf16": cpu.has("avx512_bf16"),
            "vnni": cpu.has("avx512_vnni") or cpu.has("avx_vnni"), "amx": cpu.has("amx_tile")}


def _torch_build() -> dict[str, Any] | None:
    torch = sys.modules.get("torch")  # only report what is loaded: never import torch for this
    if torch is None:
        return None
    return {"version": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_info() -> dict[str, Any]:
    from jupyter_llm.llamacpp_build import installed_build

    cpu = cpu_info()
    info: dict[str, Any] = {
        "cpu": cpu.model, "cpu_fingerprint": cpu.fingerprint, "isa": isa_flags(), "cpu_flags": cpu.isa,
        "cores": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "llama_cpp_build": (installed_build() or {}).get("tag"),
    }
    torch = _torch_build()
    if torch is not None:
        info["torch"] = torch
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def machine_line(info: dict[str, Any]) -> str:
    """'AMD EPYC, 2 cores (avx2; no avx512, avx512_bf16, vnni, amx); torch 2.13.0+cpu (AVX2 kernels, 2 threads)'."""
    isa = info.get("isa") or {}
    have = [k for k, v in isa.items() if v]
    lacks = [k for k, v in isa.items() if not v]
    flags = "; ".join(part for part in (", ".join(have), "no " + ", ".join(lacks) if lacks else "") if part)
    line = f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores ({flags or 'flags unknown'})"
    torch = info.get("torch")
    if isinstance(torch, dict):
        line += f"; torch {torch['version']} ({torch['cpu_capability']} kernels, {torch['threads']} threads)"
    if info.get("llama_cpp_build"):
        line += f"; llama.cpp build {info['llama_cpp_build']}"
    return line


def same_cpu(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two saved runs come from the same kind of CPU (only then may they share a ratio).
    Older results have no fingerprint: their model names must match."""
    if a.get("cpu_fingerprint") and b.get("cpu_fingerprint"):
        return a["cpu_fingerprint"] == b["cpu_fingerprint"]
    return a.get("cpu") == b.get("cpu")
