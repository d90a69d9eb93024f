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


@pytest.mark.parametrize("kind", ["llamacpp", "openai", "vllm", "trtllm"])
def test_the_backend_modules_import_without_their_engines(kind):
    from jupyter_llm.backends import backend_class

    cls = backend_class(kind)
    assert cls.kind == kind and cls.install_hint
