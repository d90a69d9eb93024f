"""Conformance fixtures for the onnx backend: the tiny llama exported to fp32, int8 and int4
ONNX (a few seconds each) into a temporary folder, so the suite stays fast and the user
cache untouched. fp32 is held to transformers' tokens elsewhere (tests/unit); here every
precision is held to the kit's behaviour."""
from __future__ import annotations

import pytest

__all__ = ["ONNX_BACKENDS", "onnx_export_dir", "tiny_onnx", "tiny_onnx_int4", "tiny_onnx_int8"]

ONNX_BACKENDS = ["tiny_onnx", "tiny_onnx_int8", "tiny_onnx_int4"]


@pytest.fixture(scope="session")
def onnx_export_dir(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    return tmp_path_factory.mktemp("onnx-exports")


def _load(manager, tiny_llama, export_dir, precision: str) -> str:
    name = f"tiny-onnx-{precision}"
    manager.load("onnx", str(tiny_llama), name=name, progress=False, precision=precision,
                 export_dir=str(export_dir), threads=2)
    return name


@pytest.fixture(scope="session")
def tiny_onnx(manager, tiny_llama, onnx_export_dir):
    return _load(manager, tiny_llama, onnx_export_dir, "fp32")


@pytest.fixture(scope="session")
def tiny_onnx_int8(manager, tiny_llama, onnx_export_dir):
    return _load(manager, tiny_llama, onnx_export_dir, "int8")


@pytest.fixture(scope="session")
def tiny_onnx_int4(manager, tiny_llama, onnx_export_dir):
    return _load(manager, tiny_llama, onnx_export_dir, "int4")
