"""Helpers for the server tests: a server in a background thread of the test process, SSE
parsing, Prometheus metrics reading, and polling."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from jupyter_llm.server.launcher import ServerHandle, start_server
from jupyter_llm.server.settings import ServerSettings


@contextmanager
def running_server(manager: Any, **settings: Any) -> Iterator[ServerHandle]:
    """A server on a free loopback port over `manager`, stopped afterwards."""
    handle = start_server(manager, ServerSettings(port=0, **settings))
    try:
        yield handle
    finally:
        handle.stop()


def sse_data(lines: Iterable[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream, JSON-decoded ("[DONE]" stays a string)."""
    payloads = []
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_openai_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The response is `status` with OpenAI's error object; returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "Traceback" not in error["message"]
    if status < 500 and status not in (429,):
        assert error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
