"""`%llm_backend --list` on this machine: what can load here and, when not, why."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import jupyter_llm


def test_every_backend_is_listed_with_whether_it_loads_here():
    rows = {b.kind: b for b in jupyter_llm.available_backends()}
    assert {"native", "hf", "llamacpp", "openai", "vllm", "trtllm"} <= set(rows)
    for kind in ("native", "hf", "llamacpp", "openai"):
        assert rows[kind].available, rows[kind].reason
    for kind, package in (("vllm", "vllm"), ("trtllm", "tensorrt_llm")):
        if importlib.util.find_spec(package) is None:
            assert not rows[kind].available
            assert rows[kind].reason == f"the {package} package is not installed: pip install 'jupyter-llm[{kind}]'"
        else:  # installed: then only a GPU is missing here, or nothing is
            assert rows[kind].available or "GPU" in rows[kind].reason or "CUDA" in rows[kind].reason
    assert all(row.description for row in rows.values())


def test_listing_imports_no_engine():
    """Imports stay lazy: listing (in a fresh interpreter) imports no engine package."""
    code = ("import sys, jupyter_llm; jupyter_llm.available_backends(); "
            "print([m for m in ('vllm', 'tensorrt_llm', 'llama_cpp') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_listing_imports_no_backend_module():
    """Built-in kinds are listed from their specs: no backend module, torch, transformers or httpx
    is imported (torch only once a GPU engine is installed, to ask whether CUDA is there)."""
    heavy = ["transformers", "httpx", "llama_cpp"]
    if all(importlib.util.find_spec(m) is None for m in ("vllm", "tensorrt_llm")):
        heavy.append("torch")
    code = ("import sys, jupyter_llm; from jupyter_llm.backends import SPECS; jupyter_llm.available_backends(); "
            f"names = {heavy!r} + [s.target.partition(':')[0] for s in SPECS.values()]; "
            "print([m for m in names if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_builtin_kind_has_a_spec_whose_target_is_its_class():
    from jupyter_llm.backends import BUILTIN, SPECS, backend_class

    assert set(SPECS) == set(BUILTIN)
    for kind, spec in SPECS.items():
        assert BUILTIN[kind] == spec.target and spec.description and spec.install_hint and spec.packages
        if importlib.util.find_spec(spec.packages[0]) is not None:
            assert backend_class(kind).kind == kind


@pytest.mark.parametrize("kind", ["llamacpp", "openai", "vllm", "trtllm"])
def test_the_backend_modules_import_without_their_engines(kind):
    from jupyter_llm.backends import SPECS, backend_class

    cls = backend_class(kind)
    assert cls.kind == kind and SPECS[kind].install_hint
