"""The backends the conformance kit runs against: each entry loads one into the shared
manager and returns its name. Later backends add themselves to BACKENDS."""
from __future__ import annotations

import pytest

# The backends' fixtures are named here for pytest to find (conftest fixtures must be in its namespace).
from backends_external import (  # noqa: F401
    EXTERNAL_BACKENDS,
    embedded_llamacpp,
    llamacpp_server_url,
    openai_llamacpp_server,
    openai_own_server,
    own_server_url,
)
from backends_onnx import ONNX_BACKENDS, onnx_export_dir, tiny_onnx, tiny_onnx_int4, tiny_onnx_int8  # noqa: F401

# name -> fixture that returns the loaded backend name in the session manager
BACKENDS = ["tiny_hf", "tiny_native"]
BACKENDS += EXTERNAL_BACKENDS
BACKENDS += ONNX_BACKENDS


@pytest.fixture(scope="session")
def tiny_native(manager, tiny_llama):
    """The tiny llama on the native engine, with a small KV pool (enough for every test)."""
    manager.load("native", str(tiny_llama), name="tiny-native", progress=False,
                 kv_cache_memory="4MiB", max_num_batched_tokens=64)
    return "tiny-native"


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.getfixturevalue(request.param)
