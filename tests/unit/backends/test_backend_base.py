"""The shared helpers of backends/base.py: the missing-package check and the context check."""
from __future__ import annotations

import importlib.util

import pytest

from jupyter_llm.backends import SPECS, backend_availability
from jupyter_llm.backends.base import check_prompt_fits, missing_packages, package_availability
from jupyter_llm.errors import ParamError

ABSENT = "jupyter_llm_no_such_package"


def test_missing_packages_keeps_the_order_given():
    assert missing_packages("json", ABSENT, "os", ABSENT + "2") == [ABSENT, ABSENT + "2"]
    assert missing_packages("json") == []


def test_package_availability_names_what_is_missing_and_the_install_command():
    assert package_availability("pip install x", "json") == (True, "")
    assert package_availability("pip install x", ABSENT, "json", ABSENT + "2") == (
        False, f"missing {ABSENT}, {ABSENT}2: pip install x")


@pytest.mark.parametrize("kind, package", [("hf", "transformers"), ("llamacpp", "llama_cpp"),
                                           ("onnx", "onnxruntime_genai"), ("openai", "httpx")])
def test_backends_report_a_missing_package_with_their_install_hint(kind, package, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    assert backend_availability(kind) == (False, f"missing {package}: {SPECS[kind].install_hint}")


def test_check_prompt_fits_leaves_room_for_one_token():
    check_prompt_fits(15, 16)
    with pytest.raises(ParamError, match=r"^the prompt has 16 tokens; this model accepts at most 15 prompt "
                                         r"tokens \(max_model_len 16\)$"):
        check_prompt_fits(16, 16)
