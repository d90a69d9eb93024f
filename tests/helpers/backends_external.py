"""Conformance fixtures for the llamacpp backend and the openai backend (against a real
llama-cpp-python server and against this project's own server), all on the embedded GGUF.

Also the helper that runs `python -m llama_cpp.server` on a free loopback port, which the
integration tests import.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

EXTERNAL_BACKENDS = ["embedded_llamacpp", "openai_llamacpp_server", "openai_own_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llamacpp_server(model_path: str, n_ctx: int = 2048, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """A llama-cpp-python server on 127.0.0.1 (logprobs on, requests queued rather than
    interrupted); yields its base URL and stops it afterwards."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed")
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "True",
               "--interrupt_requests", "False", "--n_threads", str(min(2, os.cpu_count() or 1)), *extra]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open for the server's life) not a pipe: its verbose log would fill a pipe and block it
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {log.read().decode(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def llamacpp_server_url(embedded_model) -> Iterator[str]:
    with llamacpp_server(str(embedded_model)) as url:
        yield url


@pytest.fixture(scope="session")
def embedded_llamacpp(manager, embedded_model) -> str:
    manager.load("llamacpp", name="embedded-llamacpp", progress=False, n_ctx=2048)
    return "embedded-llamacpp"


@pytest.fixture(scope="session")
def openai_llamacpp_server(manager, llamacpp_server_url) -> str:
    manager.load("openai", name="openai-llamacpp", progress=False, url=llamacpp_server_url, max_model_len=2048)
    return "openai-llamacpp"


@pytest.fixture(scope="session")
def own_server_url(manager, embedded_llamacpp) -> Iterator[str]:
    """This project's server (serving the embedded model on llamacpp) on a free loopback port."""
    from jupyter_llm.server.launcher import start_server
    from jupyter_llm.server.settings import ServerSettings

    # The kit asks for 5000 tokens before cancelling; the default cap (4096) would refuse that.
    handle = start_server(manager, ServerSettings(port=0, max_tokens=8192))
    yield handle.url
    handle.stop()


@pytest.fixture(scope="session")
def openai_own_server(manager, own_server_url, embedded_llamacpp) -> str:
    manager.load("openai", embedded_llamacpp, name="openai-own", progress=False, url=own_server_url)
    return "openai-own"
