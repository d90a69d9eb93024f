"""The openai backend against a scripted local server that answers 429/503, drops
connections, stalls, or streams on cue: retries (honouring Retry-After), the circuit
breaker, mid-stream failures, and a cancel that closes the HTTP request."""
from __future__ import annotations

import threading
import time

import pytest

from fake_upstream import Script, fake_upstream
from jupyter_llm.errors import BackendError, CircuitOpenError
from jupyter_llm.schema import SamplingParams

PARAMS = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture
def server():
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture
def load(manager):
    names = []

    def load(url: str, **options) -> str:
        name = f"resilience-{len(names)}"
        manager.load("openai", name=name, progress=False, url=url, **options)
        names.append(name)
        return name

    yield load
    for name in names:
        manager.unload(name)


def test_a_plain_stream(manager, server, load):
    script, url = server
    name = load(url)
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.text == " t0 t1 t2 t3" and c.token_ids == [100, 101, 102, 103] and c.prompt_tokens == 3
    body = script.bodies[0]
    assert body["return_token_ids"] is True and body["top_k"] == -1 and body["stream"] is True


def test_n_samples_are_one_request_for_a_server_that_takes_n(manager, server, load):
    script, url = server
    name = load(url)
    out = manager.generate("hi", PARAMS.replace(n=3, seed=5), backend=name)
    assert script.posts == 1 and script.bodies[0]["n"] == 3 and script.bodies[0]["seed"] == 5
    assert [c.index for c in out] == [0, 1, 2]
    assert [c.text for c in out] == [" t0 t1 t2 t3", " t0.1 t1.1 t2.1 t3.1", " t0.2 t1.2 t2.2 t3.2"]
    assert out[2].token_ids == [120, 121, 122, 123] and all(c.finish_reason == "length" for c in out)


def test_stop_strings_are_sent_and_the_servers_stop_reason_kept(manager, server, load):
    script, url = server
    name = load(url)
    [c] = manager.generate("hi", PARAMS.replace(stop=(" t2",)), backend=name)
    assert script.bodies[0]["stop"] == [" t2"]
    assert c.text == " t0 t1" and c.finish_reason == "stop" and c.stop_reason == " t2"


def test_a_stop_string_matched_here_ends_its_sample_and_the_others_go_on(manager, server, load):
    script, url = server
    name = load(url)
    out = manager.generate("hi", PARAMS.replace(n=2, stop=("1.1",)), backend=name)  # inside a token: ours to find
    assert (out[0].text, out[0].finish_reason) == (" t0 t1 t2 t3", "length")
    assert (out[1].text, out[1].finish_reason, out[1].stop_reason) == (" t0.1 t", "stop", "1.1")
    assert script.posts == 1  # the stream went on for the other sample


def test_429_and_503_are_retried(manager, server, load):
    script, url = server
    name = load(url)
    script.actions.extend([("status", 429, {"Retry-After": "0"}), ("status", 503, {})])
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.finish_reason == "length" and script.posts == 3
    assert manager.get(name).stats()["retries"] == 2


def test_a_long_retry_after_is_reported_not_waited_for(manager, server, load):
    script, url = server
    name = load(url)
    script.actions.append(("status", 429, {"Retry-After": "3600"}))
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"busy \(HTTP 429\)") as raised:
        manager.generate("hi", PARAMS, backend=name)
    assert "scripted" not in str(raised.value)  # the server's own words go to the log
    assert time.monotonic() - start < 5 and script.posts == 1


def test_dropped_connections_are_retried(manager, server, load):
    script, url = server
    name = load(url)
    script.actions.extend([("drop",), ("drop",)])
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.text == " t0 t1 t2 t3" and script.posts == 3


def test_the_circuit_opens_fails_fast_and_recovers(manager, server, load):
    script, url = server
    name = load(url, breaker_threshold=2, breaker_cooldown=1.0, max_retries=1)
    script.actions.extend([("drop",), ("drop",)])
    with pytest.raises(BackendError, match="cannot reach"):
        manager.generate("hi", PARAMS, backend=name)
    assert manager.get(name).stats()["circuit"].startswith("open (2 failed in a row")
    posts = script.posts
    start = time.monotonic()
    with pytest.raises(CircuitOpenError, match="Failing fast"):
        manager.generate("hi", PARAMS, backend=name)
    assert script.posts == posts and time.monotonic() - start < 0.5  # the server was not even tried
    time.sleep(1.1)
    assert manager.get(name).stats()["circuit"] == "half-open"
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.finish_reason == "length" and manager.get(name).stats()["circuit"] == "closed"


def test_a_stream_that_breaks_ends_the_sample_with_an_error(manager, server, load):
    script, url = server
    name = load(url)
    script.actions.append(("break", 2))
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.finish_reason == "error" and c.text == " t0 t1"
    assert "closed the stream" in c.error or "failed mid-stream" in c.error


def test_a_stream_that_stalls_counts_towards_opening_the_circuit(manager, server, load):
    script, url = server
    name = load(url, read_timeout=0.2, breaker_threshold=1)
    script.actions.append(("stream", 3, 1.0))  # a token, then silence past the read timeout
    [c] = manager.generate("hi", PARAMS, backend=name)
    assert c.finish_reason == "error" and c.text == " t0"
    assert manager.get(name).stats()["circuit"].startswith("open (1 failed in a row")


def test_server_errors_open_the_circuit(manager, server, load):
    script, url = server
    name = load(url, breaker_threshold=2, max_retries=0)
    script.actions.extend([("status", 500, {}), ("status", 502, {})])
    for _ in range(2):
        with pytest.raises(BackendError, match="HTTP 50"):
            manager.generate("hi", PARAMS, backend=name)
    with pytest.raises(CircuitOpenError):
        manager.generate("hi", PARAMS, backend=name)
    assert script.posts == 2


def test_cancel_closes_the_http_request(manager, server, load):
    script, url = server
    name = load(url)
    script.actions.append(("stream", 200, 0.02))
    stream = manager.stream("hi", PARAMS.replace(max_tokens=200), backend=name)
    next(stream), next(stream)
    stream.cancel()
    assert script.client_gone.wait(5)  # the server noticed the client went away
    assert stream.completions[0].finish_reason == "cancelled"
    deadline = time.time() + 2
    while manager.get(name).stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert manager.get(name).stats()["running"] == 0


@pytest.mark.parametrize("status", [429, 503])
def test_upstream_overload_is_our_503_with_its_retry_after(manager, server, load, status):
    """Through our server: an upstream that stays overloaded answers the client 503 with the
    upstream's Retry-After (not a 500), and the upstream's answer stays the backend error's message."""
    import httpx

    from server_helpers import assert_openai_error, running_server

    script, url = server
    name = load(url, max_retries=0)
    script.actions.append(("status", status, {"Retry-After": "7"}))
    with running_server(manager) as ours:
        answer = httpx.post(ours.url + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2},
                            timeout=30)
        assert_openai_error(answer, 503, code="upstream_busy")
        assert answer.headers["retry-after"] == "7" and f"HTTP {status}" in answer.json()["error"]["message"]
        fine = httpx.post(ours.url + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert fine.status_code == 200  # the next request, not overloaded, is served


def test_chat_through_our_server_without_a_local_tokenizer(manager, server, load):
    """The upstream applies its own chat template and counts the prompt: our server sends it the messages."""
    import httpx

    from server_helpers import running_server

    script, url = server
    name = load(url)
    assert manager.get(name).tokenizer is None
    with running_server(manager) as ours:
        answer = httpx.post(ours.url + "/v1/chat/completions", timeout=30,
                            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["choices"][0]["message"]["content"] == " t0 t1 t2 t3" and out["usage"]["prompt_tokens"] == 3
    assert script.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_a_stalled_upstream_does_not_stall_our_server(manager, server, load):
    """Without a local tokenizer nothing waits on the upstream on our server's event loop: /health
    and the other requests answer while the upstream stalls."""
    import httpx

    from server_helpers import running_server

    script, url = server
    name = load(url)
    script.actions.append(("stall", 3.0))
    with running_server(manager) as ours:
        results = {}
        slow = threading.Thread(target=lambda: results.update(slow=httpx.post(
            ours.url + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 4}, timeout=30)))
        slow.start()
        assert wait_until_posted(script, 1)
        start = time.monotonic()
        health = httpx.get(ours.url + "/health", timeout=30)
        assert health.status_code == 200 and time.monotonic() - start < 1.0
        slow.join(30)
    assert results["slow"].status_code == 200 and results["slow"].json()["choices"][0]["text"] == " t0 t1 t2 t3"


def wait_until_posted(script: Script, posts: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while script.posts < posts and time.monotonic() < deadline:
        time.sleep(0.01)
    return script.posts >= posts


@pytest.mark.parametrize("action, says", [
    (("drop",), "cannot reach the upstream server"),
    (("status", 500, {}), "the upstream server failed (HTTP 500)"),
    (("break", 1), "the upstream server closed the stream before the end"),
    (("error event", "CUDA error in /opt/vllm/worker.py"), "the upstream server failed mid-stream"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_our_clients_learn_what_failed_upstream_not_where_or_how(manager, server, load, caplog, action, says,
                                                                 stream):
    """The upstream's URL and the exception's text are the server's log's, not the client's."""
    import logging

    import httpx

    from server_helpers import running_server, sse_data

    script, url = server
    name = load(url, max_retries=0)
    script.actions.append(action)
    body = {"model": name, "prompt": "hi", "max_tokens": 4, "stream": stream}
    with caplog.at_level(logging.WARNING, logger="jupyter_llm"), running_server(manager) as ours:
        answer = httpx.post(ours.url + "/v1/completions", json=body, timeout=30)
    error = (sse_data(answer.text.splitlines())[-2] if answer.status_code == 200 else answer.json())["error"]
    host = url.removeprefix("http://")
    assert says in error["message"], error
    for internal in (host, "Error:", "CUDA", "scripted"):
        assert internal not in error["message"], error
    assert host in caplog.text  # the details are logged


def test_an_open_circuit_is_our_503_with_the_cool_down_left(manager, server, load):
    import httpx

    from server_helpers import assert_openai_error, running_server

    script, url = server
    name = load(url, breaker_threshold=1, breaker_cooldown=30.0, max_retries=0)
    script.actions.append(("status", 500, {}))
    with running_server(manager) as ours:
        body = {"model": name, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(ours.url + "/v1/completions", json=body, timeout=30).status_code == 500
        answer = httpx.post(ours.url + "/v1/completions", json=body, timeout=30)
    assert_openai_error(answer, 503, code="upstream_busy")
    assert 25 <= int(answer.headers["retry-after"]) <= 30 and "circuit is open" in answer.json()["error"]["message"]
    assert script.posts == 1
