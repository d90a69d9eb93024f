"""`jupyter-llm serve` against slow, hostile and greedy clients (issue 19): clients that post long
streams and never read, requests whose total work is too large, requests that would not fit the
hf backend's memory. Each case asserts the refusal or the recovery, that a normal request served
meanwhile still answers (and /health within a second), and that afterwards nothing runs and the KV
cache is back to where it was."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from server_helpers import assert_openai_error, metric, wait_until
from server_processes import cli_server
from tiny_models import tiny_llama_folder

pytestmark = pytest.mark.slow

WRITE_TIMEOUT = 1.0
HOSTILE, SAMPLES = 2, 8  # clients that never read, samples each
MAX_QUEUE = HOSTILE * SAMPLES + 1  # admission counts samples: theirs leave one for a normal request


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """The tiny Llama with a 4,096-token context: long answers, so that a stream's end is far off."""
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-4k"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def native(long_llama):
    args = ["--backend", "native", "--model", str(long_llama), "--name", "tiny", "--port", "0", "--threads", "1",
            # the eager path: no C++ build of the fused ops inside the served process
            "--backend-option", "kv_cache_memory=32MiB", "--backend-option", "fused_ops=false",
            "--stream-write-timeout", str(WRITE_TIMEOUT),
            "--max-queue", str(MAX_QUEUE)]
    with cli_server(args) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def metrics(client: httpx.Client) -> dict[str, float | None]:
    text = client.get("/metrics").text
    return {"running": metric(text, "jupyter_llm:num_requests_running", model_name="tiny"),
            "waiting": metric(text, "jupyter_llm:num_requests_waiting", model_name="tiny"),
            "kv_used": metric(text, "jupyter_llm:kv_cache_blocks_used", model_name="tiny"),
            "write_timeouts": metric(text, "jupyter_llm:request_errors_total", code="stream_write_timeout") or 0}


def settled(client: httpx.Client, before: dict[str, float | None]) -> bool:
    now = metrics(client)
    return now["running"] == 0 and now["waiting"] == 0 and now["kv_used"] == before["kv_used"]


def assert_serves_meanwhile(client: httpx.Client) -> None:
    """/health within a second, and a normal request's whole answer."""
    started = time.monotonic()
    assert client.get("/health").status_code == 200
    assert time.monotonic() - started < 1.0
    out = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == 4


def never_reading(url: str, body: dict) -> socket.socket:
    """A client that posts a streaming request and then reads nothing, on a small receive buffer."""
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((address.hostname, address.port))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_clients_that_stop_reading_are_cancelled_and_their_slots_freed(native):
    before = metrics(native)
    # chat logprobs make each token's chunk ~1 KB: the socket buffers (MBs on loopback) fill in seconds,
    # long before the 3,500 tokens of each sample are generated
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "stream": True, "n": SAMPLES,
            "max_tokens": 3500, "ignore_eos": True, "logprobs": True, "top_logprobs": 20}
    sockets = [never_reading(str(native.base_url), body) for _ in range(HOSTILE)]
    try:
        assert wait_until(lambda: metrics(native)["running"] == HOSTILE * SAMPLES, timeout=30)
        assert_serves_meanwhile(native)  # the one sample left
        busy = native.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 2})
        assert_openai_error(busy, 503, code="queue_full")  # admission counts their samples, not their requests
        # a stuck stream is cancelled once one write waited WRITE_TIMEOUT: KV blocks and slots come back
        assert wait_until(lambda: settled(native, before), timeout=30), metrics(native)
        assert metrics(native)["write_timeouts"] - before["write_timeouts"] == HOSTILE
        again = native.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 2, "ignore_eos": True})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
        assert_serves_meanwhile(native)
    finally:
        for sock in sockets:
            sock.close()
    assert wait_until(lambda: settled(native, before), timeout=10), metrics(native)


def test_a_request_whose_total_work_is_too_large_is_refused(native):
    before = metrics(native)
    greedy = {"prompt": ["Once upon a time"] * 64, "n": 16, "max_tokens": 2000, "logprobs": 20}
    error = assert_openai_error(native.post("/v1/completions", json=greedy), 400, param="max_tokens",
                                code="request_too_large")
    assert "65536 tokens per request" in error["message"]
    more_than_admitted = {"prompt": ["Hi", "Hello"], "n": 9, "max_tokens": 2}  # 18 samples: never admissible
    error = assert_openai_error(native.post("/v1/completions", json=more_than_admitted), 400, param="n")
    assert f"at most {MAX_QUEUE} are admitted at once" in error["message"]
    assert_serves_meanwhile(native)
    # one sample of 4,000 tokens with 20 logprobs stays admitted by default
    one_long = {"prompt": "Hi", "max_tokens": 4000, "logprobs": 20, "ignore_eos": True, "stream": True}
    with native.stream("POST", "/v1/completions", json=one_long) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["logprobs"]["top_logprobs"]
    assert wait_until(lambda: settled(native, before), timeout=10), metrics(native)


def test_the_hf_backend_refuses_what_its_memory_cannot_hold(tiny_llama):
    # 64 KiB of KV cache: 128 tokens of the tiny Llama's 512 bytes
    args = ["--backend", "hf", "--model", str(tiny_llama), "--name", "tiny", "--port", "0", "--threads", "1",
            "--backend-option", "kv_cache_memory=64KiB"]
    with cli_server(args) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        before = metrics(client)
        too_wide = {"prompt": ["Once upon a time"] * 4, "n": 4, "max_tokens": 60}
        error = assert_openai_error(client.post("/v1/completions", json=too_wide), 400, param="max_tokens")
        assert "MiB of KV cache" in error["message"] and "(--kv-cache-memory)" in error["message"]
        assert_serves_meanwhile(client)
        # several that fit alone but not together run in turn, within the budget
        fits = client.post("/v1/completions", json={"prompt": ["Hi"] * 3, "max_tokens": 50, "ignore_eos": True})
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 150
        assert wait_until(lambda: metrics(client)["running"] == 0 == metrics(client)["waiting"], timeout=10)
        assert before["running"] == 0 and client.get("/health").json()["status"] == "ok"
