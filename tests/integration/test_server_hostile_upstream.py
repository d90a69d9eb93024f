"""A real `jupyter-llm serve` whose openai backend forwards to a scripted upstream that fails
(issue 19): a stream that fails midway ends with `data: [DONE]` after its error event, an
overloaded upstream (429/503) is our 503 with its Retry-After (item 8); n and stop strings go
upstream in one request, chat goes as messages, the openai dialect's chat sends
max_completion_tokens, 5xx answers open the circuit and half-open lets one trial through
(item 12); a stalled upstream stalls neither /health nor the other
requests (item 6). Each case asserts the failure as the client sees it, that a normal request
served meanwhile answers (and /health within a second), and that nothing runs afterwards."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from fake_upstream import Script, fake_upstream
from hostile_clients import assert_health_fast, assert_serves_meanwhile, metrics, settled
from server_helpers import assert_openai_error, sse_data, wait_until
from server_processes import cli_server

pytestmark = pytest.mark.slow

NORMAL = {"prompt": "Hello", "max_tokens": 4}  # what the upstream streams when nothing is scripted: 4 tokens


def openai_args(url: str, *extra: str, breaker: str = "breaker_threshold=1000") -> list[str]:
    # no retries and (by default) a circuit that does not open: each scripted answer reaches our client as it is
    return ["--backend", "openai", "--name", "up", "--port", "0", "--backend-option", f"url={url}/v1",
            "--backend-option", "max_retries=0", "--backend-option", breaker, *extra]


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream() as (script, url):
        yield script, url


@pytest.fixture(scope="module")
def forwarding(upstream):
    script, url = upstream
    with cli_server(openai_args(url)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield script, url, client


def posted(script: Script, posts: int) -> bool:
    return wait_until(lambda: script.posts >= posts, timeout=10)


def assert_settled(client: httpx.Client, before: dict) -> None:
    assert wait_until(lambda: settled(client, before, model="up"), timeout=10), metrics(client, model="up")


@pytest.mark.parametrize("action, says", [
    (("break", 3, 0.2), "the upstream server closed the stream before the end"),
    (("error event", "CUDA error in /opt/vllm/worker.py"), "the upstream server failed mid-stream"),
])
def test_a_stream_that_fails_midway_ends_with_its_error_then_done(forwarding, action, says):
    script, url, client = forwarding
    before, posts = metrics(client, model="up"), script.posts
    script.actions.append(action)
    events: list = []

    def read() -> None:
        body = {"prompt": "Hi", "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200  # the status line left before the failure
            events.extend(sse_data(response.iter_lines()))

    reader = threading.Thread(target=read)
    reader.start()
    assert posted(script, posts + 1)
    assert_serves_meanwhile(client, NORMAL)  # the next request upstream: 4 tokens
    reader.join(30)
    assert events[-1] == "[DONE]", events  # a client reading to [DONE] is not left waiting
    error = events[-2]["error"]
    assert says in error["message"] and url.removeprefix("http://") not in error["message"], error
    assert "CUDA" not in error["message"]
    assert [e["choices"][0]["text"] for e in events[:-2]][:1] == [" t0"]  # what came before the failure
    assert_settled(client, before)


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_an_overloaded_upstream_is_our_503_with_its_retry_after(forwarding, status, stream):
    script, _, client = forwarding
    before = metrics(client, model="up")
    script.actions.append(("status", status, {"Retry-After": "7"}))
    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": stream})
    error = assert_openai_error(answer, 503, code="upstream_busy")
    assert answer.headers["retry-after"] == "7" and f"HTTP {status}" in error["message"]
    assert "scripted" not in error["message"]  # the upstream's own words go to the log
    assert_serves_meanwhile(client, NORMAL)
    assert_settled(client, before)


def test_n_and_stop_strings_go_upstream_in_one_request(forwarding):
    script, _, client = forwarding
    before, posts = metrics(client, model="up"), script.posts
    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "n": 3, "stop": [" t2"]})
    assert answer.status_code == 200, answer.text
    assert script.posts == posts + 1  # the prompt billed once, not n times
    sent = script.bodies[-1]
    assert sent["n"] == 3 and sent["stop"] == [" t2"] and sent["max_tokens"] == 4
    choices = answer.json()["choices"]
    assert (choices[0]["text"], choices[0]["finish_reason"], choices[0]["stop_reason"]) == (" t0 t1", "stop", " t2")
    # the upstream does not stop the others (" t2.1" is no token " t2"): matched here, inside the token
    assert [(c["text"], c["finish_reason"], c["stop_reason"]) for c in choices[1:]] == \
        [(" t0.1 t1.1", "stop", " t2"), (" t0.2 t1.2", "stop", " t2")]
    # chat without a local tokenizer: the messages go upstream, which applies its own template
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 4, "n": 2, "stop": ["never"]})
    assert chat.status_code == 200, chat.text
    assert script.bodies[-1]["messages"] == [{"role": "user", "content": "Hi"}] and script.posts == posts + 2
    assert script.bodies[-1]["n"] == 2 and script.bodies[-1]["stop"] == ["never"]
    assert [c["message"]["content"] for c in chat.json()["choices"]] == [" t0 t1 t2 t3", " t0.1 t1.1 t2.1 t3.1"]
    assert_serves_meanwhile(client, NORMAL)
    assert_settled(client, before)


def test_a_stalled_upstream_stalls_neither_health_nor_other_requests(forwarding):
    script, _, client = forwarding
    before, posts = metrics(client, model="up"), script.posts
    script.actions.append(("stall", 3.0))
    results: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: results.update(slow=client.post("/v1/completions", json=NORMAL)))
    slow.start()
    assert posted(script, posts + 1)
    assert_serves_meanwhile(client, NORMAL)
    assert slow.is_alive()  # still waiting on the upstream
    slow.join(30)
    assert results["slow"].status_code == 200 and results["slow"].json()["choices"][0]["text"] == " t0 t1 t2 t3"
    assert_settled(client, before)


def test_the_circuit_opens_on_server_errors_and_half_open_lets_one_trial_through(upstream):
    script, url = upstream
    args = openai_args(url, "--backend-option", "breaker_cooldown=1", breaker="breaker_threshold=2")
    with cli_server(args) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        before = metrics(client, model="up")
        script.actions.extend([("status", 500, {}), ("status", 502, {})])
        for _ in range(2):
            assert_openai_error(client.post("/v1/completions", json=NORMAL), 500)
        posts = script.posts
        open_circuit = client.post("/v1/completions", json=NORMAL)
        assert_openai_error(open_circuit, 503, code="upstream_busy")  # failing fast: the upstream not asked
        assert int(open_circuit.headers["retry-after"]) >= 1 and script.posts == posts
        assert_health_fast(client)
        time.sleep(1.2)  # half-open: one trial request, the others fail fast while it runs
        script.actions.append(("stall", 1.0))
        statuses: list[int] = []
        callers = [threading.Thread(target=lambda: statuses.append(
            client.post("/v1/completions", json=NORMAL).status_code)) for _ in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert sorted(statuses) == [200, 503, 503] and script.posts == posts + 1, statuses
        assert_serves_meanwhile(client, NORMAL)  # the trial closed the circuit
        assert_settled(client, before)


def test_the_openai_dialect_sends_max_completion_tokens_for_chat(upstream):
    script, url = upstream
    with cli_server(openai_args(url, "--backend-option", "dialect=openai")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        before, posts = metrics(client, model="up"), script.posts
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4, "n": 2})
        assert chat.status_code == 200, chat.text
        sent = script.bodies[-1]
        assert script.posts == posts + 1 and sent["n"] == 2
        assert sent["max_completion_tokens"] == 4 and "max_tokens" not in sent
        assert_health_fast(client)
        assert_settled(client, before)
