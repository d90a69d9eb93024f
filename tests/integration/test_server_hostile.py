"""`jupyter-llm serve` against slow, hostile and greedy clients (issue 19): clients that post long
streams and never read (item 1), stop strings at the length cap (2), requests whose total work is
too large (3), requests that would not fit the hf backend's memory (3), clients that hang up at
once or mid-answer and a compute thread that fails (9), numerics at the edges and the prefix
cache's salt (11). Each case asserts the refusal or the recovery, that a normal request served
meanwhile still answers (and /health within a second), and that afterwards nothing runs and the
KV cache is back to where it was.

The server-side guards (items 4-7 and 10) are in test_server_hostile_guards.py, the openai
backend's upstream failures (8, 12) in test_server_hostile_upstream.py."""
from __future__ import annotations

import json
import math
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from hostile_clients import (
    assert_health_fast,
    assert_serves_meanwhile,
    connect,
    hang_up_after_sending,
    metrics,
    never_reading,
    request_bytes,
    settled,
)
from server_helpers import assert_openai_error, sse_data, wait_until
from server_processes import cli_server
from tiny_models import tiny_llama_folder

pytestmark = pytest.mark.slow

WRITE_TIMEOUT = 1.0
HOSTILE, SAMPLES = 2, 8  # clients that never read, samples each
MAX_QUEUE = HOSTILE * SAMPLES + 1  # admission counts samples: theirs leave one for a normal request
MAX_STOP_CHARS = 1024  # the documented cap (README: "at most 16 stop strings of at most 1,024 characters")


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


def test_stop_strings_past_the_cap_are_refused_and_many_at_the_cap_stay_cheap(native):
    before = metrics(native)
    prompt = "The capital of France is"
    plain = native.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1200, "temperature": 0,
                                                  "ignore_eos": True})
    text = plain.json()["choices"][0]["text"]
    assert len(text) >= 100 + MAX_STOP_CHARS, "the test needs a long answer to cut stop strings from"

    too_long = {"prompt": prompt, "max_tokens": 4, "stop": ["x" * (MAX_STOP_CHARS + 1)]}
    error = assert_openai_error(native.post("/v1/completions", json=too_long), 400)
    assert f"at most {MAX_STOP_CHARS} characters" in error["message"] and error["param"] == "stop"
    too_many = {"prompt": prompt, "max_tokens": 4, "stop": [f"stop {i}" for i in range(17)]}
    error = assert_openai_error(native.post("/v1/completions", json=too_many), 400)
    assert "at most 16 stop strings" in error["message"] and error["param"] == "stop"

    # 16 stop strings at the cap, 15 of them near misses of the one that occurs: each automaton walks
    # ~1,000 characters of match before failing, where the old search sliced every length per token
    real = text[100:100 + MAX_STOP_CHARS]
    near = [real[:MAX_STOP_CHARS - 1 - i] + "\x00" * (i + 1) for i in range(15)]
    body = {"prompt": prompt, "max_tokens": 1200, "temperature": 0, "ignore_eos": True, "stop": [*near, real]}
    stopped = native.post("/v1/completions", json=body).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == real
    assert stopped["text"] == text[:text.find(real)]

    # two streams that match 16 near misses at every token, while a normal request answers quickly
    hostile = {**body, "stop": [*near, real[:-1] + "\x01"], "stream": True}
    answers: list[str] = []

    def run() -> None:
        with httpx.stream("POST", f"{native.base_url}/v1/completions", json=hostile, timeout=120) as response:
            answers.append("".join(c["choices"][0]["text"] for c in sse_data(response.iter_lines())
                                   if isinstance(c, dict)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: metrics(native)["running"] == 2, timeout=30)
    started = time.monotonic()
    assert_serves_meanwhile(native)
    assert time.monotonic() - started < 3.0
    for thread in threads:
        thread.join(120)
    assert answers == [text, text]  # no stop matched: the whole answer, none of it held back
    assert wait_until(lambda: settled(native, before), timeout=10), metrics(native)


def test_clients_that_hang_up_leave_nothing_running(native):
    """Hanging up right after sending (the tick before the pumps' cleanup was a window that left the
    generation running to max_tokens), with a FIN or an RST; and hanging up once the answer started."""
    url, before = str(native.base_url), metrics(native)
    long_answer = {"max_tokens": 3500, "ignore_eos": True}  # ~10 s of generation each if left running
    for i in range(16):
        body = {"prompt": f"Hello {i}", **long_answer, "stream": i % 2 == 0}
        hang_up_after_sending(url, body, path="/v1/completions", reset=i % 4 < 2)
        time.sleep(0.002 * (i % 4))
    assert wait_until(lambda: settled(native, before), timeout=5), metrics(native)
    # once admitted: a whole answer being computed, and a stream whose first chunk was read
    whole = connect(url)
    whole.sendall(request_bytes(url, "POST", "/v1/completions", {"prompt": "Hi", **long_answer}))
    assert wait_until(lambda: metrics(native)["running"] == 1, timeout=10)
    streamed = connect(url)
    streamed.sendall(request_bytes(url, "POST", "/v1/completions", {"prompt": "Hi", **long_answer, "stream": True}))
    received = b""
    while b"data: " not in received:
        received += streamed.recv(65536)
    assert metrics(native)["running"] == 2
    assert_serves_meanwhile(native)
    whole.close()
    streamed.close()
    assert wait_until(lambda: settled(native, before), timeout=5), metrics(native)
    assert_health_fast(native)


def test_a_compute_thread_that_fails_fails_its_requests_and_health_says_so(tiny_llama):
    """Faults injected into output processing (helpers/faulty_serve.py): one outside the engine's
    step costs its request only; one that ends the compute thread fails the request in flight,
    turns /health to 503 with the reason, and new requests are refused at once, not left waiting."""
    args = ["--backend", "native", "--model", str(tiny_llama), "--name", "tiny", "--port", "0", "--threads", "1",
            "--backend-option", "kv_cache_memory=4MiB", "--backend-option", "fused_ops=false"]
    command = [sys.executable, str(Path(__file__).parents[1] / "helpers" / "faulty_serve.py")]
    with cli_server(args, command=command) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        before = metrics(client)
        body = {"prompt": "Hi", "max_tokens": 4}
        error = assert_openai_error(client.post("/v1/completions", json={**body, "seed": 666}), 500,
                                    code="backend_error")
        assert "backend failed" in error["message"] and "RuntimeError" not in error["message"]  # no internals
        with client.stream("POST", "/v1/completions", json={**body, "seed": 666, "stream": True}) as response:
            events = sse_data(response.iter_lines())
        assert events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"
        assert_serves_meanwhile(client)
        assert wait_until(lambda: settled(client, before), timeout=10), metrics(client)

        assert_openai_error(client.post("/v1/completions", json={**body, "seed": 667}), 500, code="backend_error")
        health = client.get("/health")
        assert health.status_code == 503 and "compute thread" in health.json()["unavailable"]["tiny"]
        started = time.monotonic()
        refused = assert_openai_error(client.post("/v1/completions", json=body), 500, code="backend_error")
        assert "has stopped" in refused["message"] and time.monotonic() - started < 1.0
        assert wait_until(lambda: settled(client, before), timeout=10), metrics(client)


def test_a_vanishing_temperature_and_an_extreme_repetition_penalty_give_real_tokens(native):
    before = metrics(native)
    prompt = "Hello world"

    def choice(**params) -> dict:
        body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True, "logprobs": 1, **params}
        answer = native.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        out = answer.json()["choices"][0]
        assert all(math.isfinite(v) for v in out["logprobs"]["token_logprobs"]), out
        return out

    greedy = choice(temperature=0)["text"]
    assert greedy
    for temperature in (1e-37, 1e-39):  # logits / 1e-39 overflow to inf, and softmax(inf) is NaN
        assert choice(temperature=temperature)["text"] == greedy
    # a vanishing penalty favours the tokens seen without bound: every token comes from the prompt
    # (dividing by 1e-45 overflowed to inf and a NaN row sampled token 0, end-of-text)
    favoured = choice(temperature=1.0, seed=1, repetition_penalty=1e-45)
    assert all(token in prompt for token in favoured["logprobs"]["tokens"]), favoured
    assert_serves_meanwhile(native)
    assert wait_until(lambda: settled(native, before), timeout=10), metrics(native)


def test_cache_salt_keeps_the_prefix_cache_apart(native):
    """A prompt computed under one cache_salt is cold under another: its time to first token tells
    nothing about other salts' prompts. (Cold ~150 ms, cached ~15 ms for this prompt here.)"""
    before = metrics(native)
    words = random.Random(uuid.uuid4().int).choices(["the", "of", "capital", "France", "Paris", "hello"], k=700)
    prompt = " ".join(words)  # about 2,000 tokens, new to the server's prefix cache

    def seconds(salt: str) -> float:
        started = time.monotonic()
        answer = native.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "cache_salt": salt})
        assert answer.status_code == 200, answer.text
        return time.monotonic() - started

    seconds("first")
    cold, warm = [], []
    for i in range(3):
        cold.append(seconds(f"tenant-{i}"))  # the prompt is cached under other salts only
        warm.append(seconds(f"tenant-{i}"))
    assert statistics.median(cold) > 3 * statistics.median(warm), (cold, warm)
    too_long = {"prompt": "Hi", "max_tokens": 1, "cache_salt": "s" * 1025}
    assert_openai_error(native.post("/v1/completions", json=too_long), 400, param="cache_salt")
    assert_serves_meanwhile(native)
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
