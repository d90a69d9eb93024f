"""Helpers for the hostile-client tests against a real `jupyter-llm serve` (issue 19): the engine
gauges of /metrics, the check that the server serves meanwhile, and clients on raw sockets that
misbehave where httpx would not let them."""
from __future__ import annotations

import json
import socket
import struct
import time
from urllib.parse import urlsplit

import httpx

from server_helpers import metric


def metrics(client: httpx.Client, model: str = "tiny") -> dict[str, float | None]:
    """What runs in `model`'s engine now, and the stream write timeouts counted so far."""
    text = client.get("/metrics").text
    return {"running": metric(text, "jupyter_llm:num_requests_running", model_name=model),
            "waiting": metric(text, "jupyter_llm:num_requests_waiting", model_name=model),
            "kv_used": metric(text, "jupyter_llm:kv_cache_blocks_used", model_name=model),
            "write_timeouts": metric(text, "jupyter_llm:request_errors_total", code="stream_write_timeout") or 0}


def settled(client: httpx.Client, before: dict[str, float | None], model: str = "tiny") -> bool:
    """Nothing running or waiting, and the KV cache's used blocks back to `before`'s."""
    now = metrics(client, model)
    return now["running"] == 0 and now["waiting"] == 0 and now["kv_used"] == before["kv_used"]


def assert_health_fast(client: httpx.Client, limit: float = 1.0) -> None:
    started = time.monotonic()
    health = client.get("/health")
    elapsed = time.monotonic() - started
    assert health.status_code == 200, health.text
    assert elapsed < limit, f"/health took {elapsed:.2f} s"


def assert_serves_meanwhile(client: httpx.Client, body: dict | None = None, tokens: int = 4,
                            path: str = "/v1/completions", headers: dict | None = None) -> dict:
    """/health within a second, and a normal request's whole answer (`tokens` tokens)."""
    assert_health_fast(client)
    body = body or {"prompt": "Hello", "max_tokens": tokens, "ignore_eos": True}
    out = client.post(path, json=body, headers=headers)
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == tokens, out.json()
    return out.json()


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((address.hostname, address.port))
    return sock


def request_bytes(url: str, method: str, path: str, body: bytes | dict | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request as bytes; header values are sent as their UTF-8 bytes."""
    payload = json.dumps(body).encode() if isinstance(body, dict) else body or b""
    fields = {"Host": urlsplit(url).netloc, "Content-Length": str(len(payload)), "Connection": "close"}
    if isinstance(body, dict):
        fields["Content-Type"] = "application/json"
    fields.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + payload


def raw_exchange(url: str, method: str, path: str, body: bytes | dict | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a raw socket and read the whole answer (the server closes it):
    (status, headers with lower-case names, body)."""
    with connect(url) as sock:
        sock.settimeout(timeout)
        sock.sendall(request_bytes(url, method, path, body, headers))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if fields.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return int(status_line.split()[1]), fields, rest


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        length = int(size.split(b";")[0], 16)
        if length == 0:
            break
        out, data = out + data[:length], data[length + 2:]
    return out


def never_reading(url: str, body: dict, path: str = "/v1/chat/completions") -> socket.socket:
    """A client that posts a streaming request and then reads nothing, on a small receive buffer."""
    sock = connect(url, receive_buffer=4096)
    sock.sendall(request_bytes(url, "POST", path, body, {"Connection": None}))
    return sock


def hang_up_after_sending(url: str, body: dict, path: str = "/v1/completions", reset: bool = False) -> None:
    """A client that posts its request and closes the connection at once (with `reset`, an RST)."""
    sock = connect(url)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(request_bytes(url, "POST", path, body, {"Connection": None}))
    sock.close()
