"""One behaviour for every backend: streaming, stop strings, seeds, n, logprobs,
max_tokens, cancellation, concurrency, and refusal of what capabilities exclude."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import GenerationRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_streaming_arrives_token_by_token(manager, backend):
    stream = manager.stream("Once upon a time", GREEDY, backend=backend)
    events = list(stream)
    token_events = [e for e in events if e.token_ids]
    # a consumer that lags gets the tokens since its last read in one event (event_mailbox.py)
    assert len(token_events) > 1 and sum(len(e.token_ids) for e in token_events) == 12
    assert events[-1].finish_reason == "length"
    completion = stream.completions[0]
    assert "".join(e.text for e in events) == completion.text
    assert completion.token_ids == [t for e in events for t in e.token_ids]
    assert completion.timings.ttft is not None and len(completion.timings.token_times) == 12


def test_max_tokens_and_length(manager, backend):
    [c] = manager.generate("Hello", GREEDY.replace(max_tokens=5), backend=backend)
    assert c.completion_tokens == 5 and c.finish_reason == "length" and c.prompt_tokens > 0


def test_stop_string_cuts_the_text_and_is_not_shown(manager, backend):
    [full] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=24), backend=backend)
    assert len(full.text) > 6
    stop = full.text[3:6]
    [cut] = manager.generate("The capital of France is", GREEDY.replace(max_tokens=24, stop=(stop,)), backend=backend)
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]


def test_seed_reproduces_and_differs(manager, backend):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    a = manager.generate("Hello", params, backend=backend)[0]
    b = manager.generate("Hello", params, backend=backend)[0]
    c = manager.generate("Hello", params.replace(seed=43), backend=backend)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_n_samples_come_back_next_to_each_other(manager, backend):
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=1, ignore_eos=True)
    out = manager.generate(["Hello", "Once"], params, backend=backend)
    assert [(c.prompt_index, c.index) for c in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(c.token_ids) for c in out[:3]}) > 1  # the samples differ


def test_logprobs_with_top_alternatives(manager, backend):
    [c] = manager.generate("Hello", GREEDY.replace(max_tokens=4, logprobs=3), backend=backend)
    assert len(c.logprobs) == 4
    for token_id, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == token_id and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.top[0][0] == token_id  # greedy: the chosen token is the most likely one
        assert lp.logprob == pytest.approx(lp.top[0][2], abs=1e-4)


def test_concurrent_requests_each_get_their_own_output(manager, backend):
    prompts = ["Hello", "The capital of France is", "Once upon a time there", "def add(a, b):"]
    alone = [manager.generate(p, GREEDY, backend=backend)[0].token_ids for p in prompts]
    # A server that reuses its last request's KV prefix (llama-cpp-python) evaluates a prompt
    # repeated at once in another split, and its float sums change: each phase below starts
    # after a prompt that none of them shares, so that only the interleaving differs.
    separate = "Numbers: 1, 2, 3"
    manager.generate(separate, GREEDY, backend=backend)
    together = [c.token_ids for c in manager.generate(prompts, GREEDY, backend=backend)]
    assert together == alone
    manager.generate(separate, GREEDY, backend=backend)

    async def run_concurrently():
        return await asyncio.gather(*(manager.agenerate(p, GREEDY, backend=backend) for p in prompts))

    results = asyncio.run(run_concurrently())
    assert [r[0].token_ids for r in results] == alone


def test_cancel_stops_the_request_and_the_backend_stays_usable(manager, backend):
    long = SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True)
    stream = manager.stream("Hello", long, backend=backend)
    seen = 0
    for event in stream:
        seen += len(event.token_ids)
        if seen >= 3:
            stream.cancel()
            break
    [c] = stream.completions
    assert c.finish_reason == "cancelled" and 3 <= c.completion_tokens < 5000
    deadline = time.time() + 5
    while manager.get(backend).stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert manager.get(backend).stats()["running"] == 0
    assert manager.generate("Hello", GREEDY.replace(max_tokens=3), backend=backend)[0].completion_tokens == 3


def test_cancel_by_request_id_from_another_thread(manager, backend):
    stream = manager.stream("Hello", SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True),
                            backend=backend)
    request_id = stream.requests[0].id
    first = next(stream)
    threading.Thread(target=manager.cancel, args=(request_id,)).start()
    rest = list(stream)
    assert first.token_ids and rest[-1].finish_reason == "cancelled"
    assert stream.completions[0].finish_reason == "cancelled"


def test_refuses_what_capabilities_exclude(manager, backend):
    target = manager.get(backend)
    caps = target.capabilities
    cases = {
        "logprobs": SamplingParams(logprobs=2), "seeds": SamplingParams(seed=1),
        "penalties": SamplingParams(presence_penalty=0.5), "top_k": SamplingParams(top_k=5),
        "min_p": SamplingParams(min_p=0.1),
    }
    for capability, params in cases.items():
        request = GenerationRequest(prompt="Hello", params=params)
        if getattr(caps, capability):
            target.check_request(request)
        else:
            with pytest.raises(ParamError, match="does not support"):
                target.check_request(request)


def test_prompt_beyond_the_context_is_refused(manager, backend):
    limit = manager.get(backend).max_model_len
    with pytest.raises(ParamError, match="max_model_len"):
        manager.generate("hello " * (limit + 10), GREEDY, backend=backend)
