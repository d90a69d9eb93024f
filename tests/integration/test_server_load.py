"""Load on loopback: 64 concurrent streaming clients, three rounds, each client with its own
prompt and seed; every stream must equal the whole (non-streamed) answer for the same seed,
so that a lost, cut or mixed-up response shows. A tenth of the clients hang up mid-stream;
afterwards nothing runs or waits in the engine and, where the backend reports KV blocks,
every block is free again."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server_helpers import metric, running_server, wait_until

pytestmark = pytest.mark.slow

CLIENTS = 64
ROUNDS = 3


@pytest.fixture(scope="module")
def tiny_native_server(manager, tiny_llama):
    manager.load("native", str(tiny_llama), name="server-native", progress=False, kv_cache_memory="4MiB")
    yield "server-native"
    manager.unload("server-native")


@pytest.fixture(params=["tiny_hf", "tiny_native_server"])
def model(request):
    return request.getfixturevalue(request.param)


def body(model: str, round_: int, client: int, leaves: bool) -> dict:
    return {"model": model, "prompt": f"Client {client} of round {round_} says:", "seed": 1000 * round_ + client,
            "temperature": 1.0, "max_tokens": 400 if leaves else 10 + client % 7, "ignore_eos": True}


async def streamed(http: httpx.AsyncClient, request: dict, leaves: bool) -> tuple[str, set, int] | None:
    """(text, chunk ids, completion tokens) of a streamed answer; None for a client that hangs up."""
    payload = {**request, "stream": True, "stream_options": {"include_usage": True}}
    text, ids, usage = "", set(), None
    async with http.stream("POST", "/v1/completions", json=payload) as response:
        assert response.status_code == 200, await response.aread()
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            if chunk["choices"]:
                assert chunk["choices"][0]["index"] == 0
                text += chunk["choices"][0]["text"]
            else:
                usage = chunk["usage"]["completion_tokens"]
            chunks += 1
            if leaves and chunks == 3:
                return None  # leaving the block closes the connection mid-stream
    return text, ids, usage


async def whole(http: httpx.AsyncClient, request: dict) -> tuple[str, int]:
    response = await http.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    out = response.json()
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


async def one_round(url: str, model: str, round_: int) -> int:
    leaving = {c for c in range(CLIENTS) if c % 10 == 0}
    requests = [body(model, round_, c, c in leaving) for c in range(CLIENTS)]
    limits = httpx.Limits(max_connections=2 * CLIENTS, max_keepalive_connections=2 * CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        streams = await asyncio.gather(*(streamed(http, r, c in leaving) for c, r in enumerate(requests)))
        references = await asyncio.gather(*(whole(http, r) for c, r in enumerate(requests) if c not in leaving))
    stayed = [s for c, s in enumerate(streams) if c not in leaving]
    assert all(s is None for c, s in enumerate(streams) if c in leaving)
    for client, ((text, ids, usage), (expected, tokens)) in enumerate(zip(stayed, references)):
        assert len(ids) == 1, f"client {client}: chunks of several responses"
        assert (text, usage) == (expected, tokens), f"client {client}: the stream differs from the whole answer"
    assert len({ids.pop() for _, ids, _ in stayed}) == len(stayed), "two clients got the same response"
    return len(leaving)


def test_64_streaming_clients_three_rounds_with_hang_ups(manager, model):
    with running_server(manager) as server:
        scrape = lambda: httpx.get(server.url + "/metrics").text
        left = 0
        for round_ in range(ROUNDS):
            left += asyncio.run(one_round(server.url, model, round_))

            def idle() -> bool:
                text = scrape()
                return (metric(text, "jupyter_llm:num_requests_running", model_name=model) == 0
                        and metric(text, "jupyter_llm:num_requests_waiting", model_name=model) == 0
                        and metric(text, "jupyter_llm:kv_cache_blocks_used", model_name=model) in (None, 0))

            assert wait_until(idle, timeout=10), scrape()
            assert not server.app.state.generation.inflight
        text = scrape()
        assert metric(text, "jupyter_llm:request_errors_total", code="client_disconnected") == left
        served = metric(text, "jupyter_llm:e2e_request_latency_seconds_count", model_name=model)
        assert served == ROUNDS * 2 * CLIENTS - 2 * left  # leavers send no whole request either
        if model == "server-native":
            assert metric(text, "jupyter_llm:kv_cache_blocks_total", model_name=model) > 0
