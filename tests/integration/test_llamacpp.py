"""The llamacpp backend on the embedded GGUF: real answers, token-by-token streaming, stop
strings, logprobs, chat, seeds, queueing, and a cancel that frees the model at once."""
from __future__ import annotations

import threading
import time

import pytest

from jupyter_llm.schema import SamplingParams

pytestmark = pytest.mark.embedded
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llamacpp(manager, embedded_model):
    pytest.importorskip("llama_cpp")
    manager.load("llamacpp", name="it-llamacpp", progress=False, n_ctx=1024, n_threads=2)
    yield "it-llamacpp"
    manager.unload("it-llamacpp")


def test_greedy_completion_knows_paris(manager, llamacpp):
    [c] = manager.generate("The capital of France is", GREEDY, backend=llamacpp)
    assert "Paris" in c.text and c.finish_reason == "length" and c.completion_tokens == 8


def test_status_shows_gguf_type_and_no_batching(manager, llamacpp):
    info = manager.info(llamacpp)
    assert info.backend == "llamacpp" and info.device == "cpu" and info.dtype == "Q4_1"
    assert info.extra["batching"] == "none (one sequence at a time)"
    assert manager.get(llamacpp).max_model_len == 1024


def test_tokens_stream_one_at_a_time(manager, llamacpp):
    events = list(manager.stream("Once upon a time", GREEDY.replace(max_tokens=6, ignore_eos=True),
                                 backend=llamacpp))
    tokens = [e for e in events if e.token_ids]
    assert [len(e.token_ids) for e in tokens] == [1] * 6
    stamps = [e.timestamp for e in tokens]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # they arrive over time, not at the end


def test_stop_string(manager, llamacpp):
    [c] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=16, stop=(".",)),
                           backend=llamacpp)
    assert c.text == " Paris" and c.finish_reason == "stop" and c.stop_reason == "."


def test_logprobs_with_alternatives(manager, llamacpp):
    [c] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=2, logprobs=5), backend=llamacpp)
    first = c.logprobs[0]
    assert first.token == " Paris" and len(first.top) == 5 and first.top[0][1] == " Paris"
    assert -3 < first.logprob < 0


def test_chat_uses_the_gguf_template(manager, llamacpp):
    [c] = manager.generate("Say hello.", SamplingParams(max_tokens=24, temperature=0), backend=llamacpp, chat=True)
    assert c.text.strip() and c.prompt_tokens > 20  # the template's system prompt is there


def test_seeds_and_n_samples_run_one_after_the_other(manager, llamacpp):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True)
    first = manager.generate("Hello", params, backend=llamacpp)
    again = manager.generate("Hello", params, backend=llamacpp)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1


def test_concurrent_requests_queue_fairly(manager, llamacpp):
    backend = manager.get(llamacpp)
    seen = []
    stream = manager.stream(["one", "two", "three"], GREEDY.replace(max_tokens=4, ignore_eos=True), backend=llamacpp)
    for event in stream:
        if event.token_ids and not seen:
            seen.append(backend.stats())
    assert seen[0]["running"] == 1 and seen[0]["waiting"] == 2  # one at a time, the others queued
    assert [c.completion_tokens for c in stream.completions] == [4, 4, 4]


def test_cancel_frees_the_model_for_the_next_request(manager, llamacpp):
    stream = manager.stream("Hello", SamplingParams(max_tokens=900, temperature=0, ignore_eos=True),
                            backend=llamacpp)
    next(stream)
    threading.Timer(0.05, stream.cancel).start()
    list(stream)
    assert stream.completions[0].finish_reason == "cancelled"
    assert stream.completions[0].completion_tokens < 900
    deadline = time.time() + 2
    while manager.get(llamacpp).stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    [c] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=2), backend=llamacpp)
    assert "Paris" in c.text and time.monotonic() - start < 10
