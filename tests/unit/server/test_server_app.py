"""The app over the tiny model, through a real uvicorn on loopback: response shapes, streams,
sampling options, /health, /metrics, admission, disconnects, failures and shutdown."""
import threading
import time

import httpx
import pytest

from jupyter_llm.manager import EngineManager
from manager_helpers import load_keeping_default, manager_with
from server_helpers import assert_openai_error, metric, running_server, sse_data, wait_until

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(manager, tiny_hf):
    with running_server(manager) as handle:
        yield handle


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post(client, path, **body):
    response = client.post(path, json={"model": "tiny-hf", **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(client, path, **body):
    with client.stream("POST", path, json={"model": "tiny-hf", "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return sse_data(response.iter_lines())


def test_completion_shape_and_usage(client):
    out = post(client, "/v1/completions", prompt="Once upon a time", max_tokens=5, ignore_eos=True)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny-hf"
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"]["completion_tokens"] == 5 and out["usage"]["prompt_tokens"] > 0
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 5


def test_prompt_batch_with_n_orders_choices_and_counts_each_prompt_once(client):
    out = post(client, "/v1/completions", prompt=["Hello", "Once upon a time"], n=2, max_tokens=3, ignore_eos=True,
               seed=4)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    single = [post(client, "/v1/completions", prompt=p, max_tokens=3, ignore_eos=True, seed=4)
              for p in ("Hello", "Once upon a time")]
    assert out["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
    assert out["usage"]["completion_tokens"] == 12
    assert out["choices"][0]["text"] == single[0]["choices"][0]["text"]
    assert out["choices"][2]["text"] == single[1]["choices"][0]["text"]


def test_chat_shape(client):
    out = post(client, "/v1/chat/completions", messages=HELLO, max_completion_tokens=4, ignore_eos=True)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert out["usage"]["completion_tokens"] == 4


def test_chat_without_max_tokens_gets_the_rest_of_the_context_up_to_the_server_cap(manager, tiny_hf):
    with running_server(manager, max_tokens=7) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
        out = post(c, "/v1/chat/completions", messages=HELLO, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 7


def test_stream_matches_the_whole_answer_and_ends_with_usage_and_done(client):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 7, "ignore_eos": True}
    whole = post(client, "/v1/completions", **body)
    events = stream(client, "/v1/completions", stream_options={"include_usage": True}, **body)
    assert events[-1] == "[DONE]"
    *chunks, final = events[:-1]
    assert final["choices"] == [] and final["usage"] == whole["usage"]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_chat_stream_deltas_start_with_the_role_for_every_choice(client):
    events = stream(client, "/v1/chat/completions", messages=HELLO, n=2, max_tokens=4, ignore_eos=True)
    chunks = events[:-1]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[0]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and "role" not in mine[-1]["delta"]
        assert mine[-1]["finish_reason"] == "length"


def test_stop_string_ends_the_text_before_it(client):
    free = post(client, "/v1/completions", prompt="Hello", max_tokens=20, seed=11, ignore_eos=True)
    text = free["choices"][0]["text"]
    stop = text[5:7]
    assert stop.strip(), text
    out = post(client, "/v1/completions", prompt="Hello", max_tokens=20, seed=11, ignore_eos=True, stop=[stop])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.index(stop)]
    assert choice["stop_reason"] == stop
    *_, last = [e for e in stream(client, "/v1/completions", prompt="Hello", max_tokens=20, seed=11,
                                  ignore_eos=True, stop=[stop]) if e != "[DONE]"]
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["stop_reason"] == stop  # as vLLM


def test_seed_reproduces_and_other_seeds_differ(client):
    texts = [post(client, "/v1/completions", prompt="Hello", max_tokens=16, seed=s, ignore_eos=True)
             ["choices"][0]["text"] for s in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]


def test_vllm_extras_and_penalties_are_accepted(client):
    out = post(client, "/v1/completions", prompt="Hello", max_tokens=6, top_k=5, min_p=0.01, top_p=0.9,
               repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, ignore_eos=True, seed=1)
    assert out["usage"]["completion_tokens"] == 6


def test_completion_logprobs(client):
    out = post(client, "/v1/completions", prompt="Hello", max_tokens=4, logprobs=3, ignore_eos=True, seed=2)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0


def test_chat_logprobs_in_whole_and_streamed_answers(client):
    out = post(client, "/v1/chat/completions", messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2,
               ignore_eos=True)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    chunks = stream(client, "/v1/chat/completions", messages=HELLO, max_tokens=3, logprobs=True, ignore_eos=True)
    streamed = [e for c in chunks[:-1] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert len(streamed) == 3 and all(e["top_logprobs"] == [] for e in streamed)


def test_omitted_model_uses_the_default_backend(client, manager):
    out = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    assert out["model"] == manager.default


def test_models_health_and_openapi(client, manager):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and "tiny-hf" in [m["id"] for m in models["data"]]
    card = client.get("/v1/models/tiny-hf").json()
    assert card["max_model_len"] == 512 and card["backend"] == "hf"
    assert client.get("/health").status_code == 200
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_metrics_have_vllm_like_names(client):
    post(client, "/v1/completions", prompt="Hello", max_tokens=3, ignore_eos=True)
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    text = client.get("/metrics").text
    labels = {"model_name": "tiny-hf"}
    assert metric(text, "jupyter_llm:num_requests_running", **labels) == 0
    assert metric(text, "jupyter_llm:num_requests_waiting", **labels) == 0
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total"):
        assert metric(text, "jupyter_llm:" + name, **labels) > 0, name
    assert metric(text, "jupyter_llm:request_success_total", finished_reason="length", **labels) > 0
    assert metric(text, "jupyter_llm:request_errors_total", code="model_not_found") >= 1


def test_metrics_show_speculative_decoding(manager, tiny_llama, client):
    load_keeping_default(manager, "native", str(tiny_llama), name="tiny-spec", progress=False,
                         kv_cache_memory="8MiB", speculative="ngram")
    try:
        response = client.post("/v1/completions", json={"model": "tiny-spec", "prompt": "a b a b a b a b a b",
                                                         "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        text = client.get("/metrics").text
        labels = {"model_name": "tiny-spec"}
        drafts = metric(text, "jupyter_llm:spec_decode_num_drafts_total", **labels)
        proposed = metric(text, "jupyter_llm:spec_decode_num_draft_tokens_total", **labels)
        accepted = metric(text, "jupyter_llm:spec_decode_num_accepted_tokens_total", **labels)
        assert drafts > 0 and proposed >= drafts and 0 <= accepted <= proposed
        assert metric(text, "jupyter_llm:spec_decode_draft_acceptance_rate", **labels) == pytest.approx(
            accepted / proposed, abs=1e-3)
        assert "spec_decode" not in "".join(line for line in text.splitlines() if 'model_name="tiny-hf"' in line)
    finally:
        manager.unload("tiny-spec")


def test_health_is_503_while_a_backend_cannot_serve(tiny_llama):
    """A backend whose compute thread is gone makes /health answer 503 with the reason."""
    fresh = EngineManager()
    try:
        fresh.load("hf", str(tiny_llama), name="tiny", progress=False)
        backend = fresh.get("tiny")
        with running_server(fresh) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            alive, dead = backend._thread, threading.Thread(target=lambda: None)
            dead.start()
            dead.join()
            backend._thread = dead  # as if the compute thread had died
            try:
                answer = c.get("/health")
            finally:
                backend._thread = alive
            assert answer.status_code == 503 and answer.json()["status"] == "unavailable"
            assert "compute thread" in answer.json()["unavailable"]["tiny"]
            assert c.get("/health").status_code == 200
    finally:
        fresh.shutdown()


def test_health_is_503_until_a_model_is_loaded(tiny_llama):
    empty = EngineManager()
    try:
        with running_server(empty) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
            assert c.get("/health").status_code == 503
            assert_openai_error(c.post("/v1/completions", json={"prompt": "Hi"}), 503, code="model_not_loaded")
            assert c.get("/v1/models").json()["data"] == []
            empty.load("hf", str(tiny_llama), name="late", progress=False)
            assert c.get("/health").status_code == 200
            assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()["model"] == "late"
    finally:
        empty.shutdown()


def test_a_full_queue_answers_503_with_retry_after(manager, tiny_hf):
    with running_server(manager, max_queue=1) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
        body = {"model": "tiny-hf", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)
            busy = c.post("/v1/completions", json={"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2})
            error = assert_openai_error(busy, 503, code="queue_full")
            assert busy.headers["retry-after"] == "1" and "busy" in error["message"]
        assert wait_until(lambda: not handle.app.state.generation.inflight)
        assert c.post("/v1/completions", json={"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def running(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        return metric(c.get("/metrics").text, "jupyter_llm:num_requests_running", model_name="tiny-hf")


def test_a_client_that_leaves_mid_stream_cancels_its_request(server):
    body = {"model": "tiny-hf", "prompt": "Hello", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert running(server) == 1
    assert wait_until(lambda: running(server) == 0, timeout=5)
    assert not server.app.state.generation.inflight


def test_a_client_that_leaves_before_a_whole_answer_cancels_it(server):
    body = {"model": "tiny-hf", "prompt": "Hello", "max_tokens": 500, "ignore_eos": True}

    def leave_early():
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as c:
            c.post("/v1/completions", json=body)

    leave_early()
    assert wait_until(lambda: running(server) == 0, timeout=5)
    assert wait_until(lambda: not server.app.state.generation.inflight, timeout=5)


@pytest.fixture
def fake(monkeypatch):
    """A fresh manager with the scripted backend loaded as 'fake'."""
    with manager_with(monkeypatch, "fake", "server_fake_backend:FakeBackend") as fresh:
        yield fresh


def test_a_failing_request_gets_an_error_and_the_others_are_unaffected(fake):
    with running_server(fake) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
        results = {}

        def call(name, prompt, stream=False):
            body = {"prompt": prompt, "max_tokens": 8, "stream": stream}
            if stream:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    results[name] = (r.status_code, sse_data(r.iter_lines()))
            else:
                r = c.post("/v1/completions", json=body)
                results[name] = (r.status_code, r.json())

        calls = [("ok1", "slow one"), ("fail", "slow fail"), ("raise", "raise"), ("ok2", "slow two", True),
                 ("fail-stream", "slow fail", True)]
        threads = [threading.Thread(target=call, args=args) for args in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for ok in ("ok1", "ok2"):
            assert results[ok][0] == 200
        assert results["ok1"][1]["choices"][0]["text"] == "".join(f"t{i} " for i in range(8))
        assert results["ok2"][1][-1] == "[DONE]"
        assert results["fail"][0] == 500 and results["fail"][1]["error"]["code"] == "backend_error"
        failed = results["fail"][1]["error"]["message"]
        assert "backend failed" in failed and "the engine failed" not in failed  # its words stay in the log
        assert results["raise"][0] == 500 and results["raise"][1]["error"]["type"] == "server_error"
        assert "boom" not in results["raise"][1]["error"]["message"]  # internals stay in the log
        status, events = results["fail-stream"]
        assert status == 200 and events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"


def test_text_that_arrives_with_a_failure_is_streamed_before_the_error(fake):
    """A client that lags gets a sample's tokens folded into one event, the failure's too: its text
    was dropped with the error event (seen against a real server, issue 19's upstream test)."""
    with running_server(fake) as handle, httpx.Client(base_url=handle.url, timeout=60) as c:
        body = {"prompt": "folded fail", "max_tokens": 8, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as response:
            events = sse_data(response.iter_lines())
    assert [e["choices"][0]["text"] for e in events[:-2]] == ["t0 t1 "]
    assert events[0]["choices"][0]["finish_reason"] is None
    assert events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"


def test_stop_lets_in_flight_requests_finish_and_frees_the_port(fake):
    result = {}
    with running_server(fake, shutdown_timeout=5) as handle:
        def call():
            with httpx.Client(base_url=handle.url, timeout=30) as c:
                result["response"] = c.post("/v1/completions", json={"prompt": "slow", "max_tokens": 10})

        caller = threading.Thread(target=call)
        caller.start()
        assert wait_until(lambda: fake.get().running == 1)
        handle.stop()
        caller.join(10)
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 10
    assert not handle.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "/health")


def test_stop_cancels_what_outlives_the_shutdown_timeout_and_tells_the_clients(fake):
    chunks, answers = [], []
    with running_server(fake, shutdown_timeout=1) as handle:
        def call():
            body = {"prompt": "slow", "max_tokens": 1000, "stream": True}
            try:
                with httpx.Client(base_url=handle.url, timeout=30) as c, \
                        c.stream("POST", "/v1/completions", json=body) as r:
                    chunks.extend(r.iter_lines())
            except httpx.HTTPError:
                pass

        def whole():
            with httpx.Client(base_url=handle.url, timeout=30) as c:
                answers.append(c.post("/v1/completions", json={"prompt": "slow", "max_tokens": 1000}))

        callers = [threading.Thread(target=call), threading.Thread(target=whole)]
        for caller in callers:
            caller.start()
        assert wait_until(lambda: fake.get().running == 2)
        started = time.monotonic()
        handle.stop()
        assert time.monotonic() - started < 5
    assert wait_until(lambda: fake.get().running == 0) and len(fake.get().cancelled) == 2
    for caller in callers:
        caller.join(10)
    events = sse_data(chunks)
    assert events[-2]["error"]["code"] == "request_cancelled" and events[-1] == "[DONE]"
    assert_openai_error(answers[0], 503, code="request_cancelled")


def test_a_model_can_be_named_by_its_model_name_when_one_backend_serves_it(fake):
    with running_server(fake) as handle, httpx.Client(base_url=handle.url, timeout=30) as c:
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=body).json()["model"] == "fake"
        fake.load("fake", name="fake-2", progress=False)
        assert_openai_error(c.post("/v1/completions", json=body), 400, "model", "ambiguous_model")
