"""Servers the way users start them: `%llm_serve` in a real kernel, and `jupyter-llm serve`
in a subprocess. Each yields the server's base URL (without /v1)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kernel_helpers import Kernel

URL = re.compile(r"server at (http://127\.0\.0\.1:\d+)/v1")


@contextmanager
def kernel_server(model_folder: Path, name: str = "tiny") -> Iterator[tuple[str, Kernel]]:
    """A real ipykernel with the model loaded as `name` and `%llm_serve --port 0` running."""
    kernel = Kernel()
    try:
        kernel.run("%load_ext jupyter_llm")
        loaded = kernel.run(f"%llm_backend hf {model_folder} --name {name}")
        assert "loaded" in loaded.text, loaded.text
        started = kernel.run("%llm_serve --port 0")
        match = URL.search(started.text)
        assert match and not started.errors, started.text
        yield match.group(1), kernel
        stopped = kernel.run("%llm_serve --stop")
        assert "stopped the server" in stopped.text, stopped.text
    finally:
        kernel.shutdown()


class CLIServer:
    """`jupyter-llm serve ...` in a subprocess (or `command`, another server that prints the same
    banner line); its output is collected in the background."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
                 command: list[str] | None = None):
        command = command or [sys.executable, "-m", "jupyter_llm.cli", "serve"]
        self.process = subprocess.Popen([*command, *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not (match := URL.search("".join(self.stdout))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"jupyter-llm serve did not start:\n{''.join(self.stderr)[-3000:]}")
            time.sleep(0.05)
        self.url = match.group(1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Send `sig` and wait for the process to end; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@contextmanager
def cli_server(args: list[str], env: dict[str, str] | None = None,
               command: list[str] | None = None) -> Iterator[CLIServer]:
    server = CLIServer(args, env, command=command)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
