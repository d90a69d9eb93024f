import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from jupyter_llm.completions import build_requests
from jupyter_llm.errors import BackendError, NoBackendError, ParamError, QueueFullError
from jupyter_llm.manager import EngineManager
from jupyter_llm.schema import SamplingParams


def test_build_requests_prompt_chat_and_conversations():
    [r] = build_requests("hi")
    assert r.prompt == "hi" and not r.is_chat
    [r] = build_requests("hi", chat=True, system="be brief")
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}]
    [r] = build_requests(history, chat=True)
    assert r.messages == history
    assert len(build_requests(["a", "b", history], chat=True)) == 3
    with pytest.raises(ParamError):
        build_requests([])


def test_a_builder_that_keeps_counts_only_keeps_no_output():
    from jupyter_llm.completions import CompletionBuilder
    from jupyter_llm.schema import TokenEvent, TokenLogprob

    [request] = build_requests("hi", SamplingParams(logprobs=20))
    kept, counted = (CompletionBuilder([request], "hf", "m", keep_output=keep) for keep in (True, False))
    for token_id in range(100):
        entry = TokenLogprob(token_id, "ab", -1.0)
        event = TokenEvent(request.id, 0, text="ab", token_ids=[token_id], logprobs=[entry])
        kept.add(event)
        counted.add(event)
    done = TokenEvent(request.id, 0, finish_reason="length", prompt_tokens=2)
    kept.add(done)
    counted.add(done)
    [whole], [tally] = kept.completions(), counted.completions()
    assert (whole.completion_tokens, len(whole.text), len(whole.logprobs)) == (100, 200, 100)
    assert (tally.completion_tokens, tally.text, tally.token_ids, tally.logprobs) == (100, "", [], None)
    assert tally.usage == whole.usage and tally.finish_reason == "length" and tally.timings.ttft is not None
    assert tally.timings.token_times == []


def test_names_default_use_and_unload(tiny_llama):
    m = EngineManager()
    try:
        with pytest.raises(NoBackendError, match="no backend is loaded"):
            m.generate("x")
        m.load("hf", str(tiny_llama), name="a", progress=False)
        m.load("hf", str(tiny_llama), name="b", progress=False, max_num_seqs=2)
        assert m.default == "b"  # the latest loaded is the default
        m.use("a")
        assert m.default == "a" and [i.default for i in m.backends()] == [True, False]
        with pytest.raises(NoBackendError, match="loaded: a, b"):
            m.use("c")
        m.unload("a")
        assert m.default == "b" and m.names() == ["b"]
        info = m.backends()[0]
        assert (info.backend, info.model, info.device, info.dtype) == ("hf", tiny_llama.name, "cpu", "float32")
    finally:
        m.shutdown()


def test_unknown_backend_and_options_are_clear_errors(tiny_llama):
    m = EngineManager()
    try:
        with pytest.raises(BackendError, match="unknown backend 'nope'; available: native, hf"):
            m.load("nope")
        with pytest.raises(ParamError, match="unknown option.*--max-num-seqs"):
            m.load("hf", str(tiny_llama), max_num_seq=3)
        with pytest.raises(ParamError, match="unknown dtype 'float8'"):
            m.load("hf", str(tiny_llama), dtype="float8", progress=False)
        with pytest.raises(BackendError, match="no CUDA GPU"):
            m.load("hf", str(tiny_llama), device="cuda", progress=False)
    finally:
        m.shutdown()


def test_admission_queue_is_bounded(tiny_llama):
    m = EngineManager(max_queue=2)
    try:
        m.load("hf", str(tiny_llama), progress=False)
        long = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
        stream = m.stream(["a", "b"], long)
        next(stream)
        with pytest.raises(QueueFullError, match="the limit is 2"):
            m.generate("c", SamplingParams(max_tokens=2))
        stream.cancel()  # returns once both requests have left: their slots are free now
        assert m.inflight() == 0  # (ignore_eos below: a random tiny model may end at once)
        assert m.generate("c", SamplingParams(max_tokens=2, ignore_eos=True))[0].completion_tokens == 2
    finally:
        m.shutdown()


def test_admission_counts_samples_not_requests(manager, tiny_hf):
    long = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0, n=3)
    stream = manager.stream(["a"], long, backend=tiny_hf)
    try:
        next(stream)
        assert manager.inflight() == 3

        async def one_more(n, limit=4):
            async for _ in manager.astream(build_requests("b", SamplingParams(max_tokens=1, n=n)), tiny_hf, limit):
                pass

        with pytest.raises(QueueFullError, match="busy: 3 samples in flight and 2 asked for, the limit is 4"):
            asyncio.run(one_more(2))
        with pytest.raises(ParamError, match="ask for 5 samples in one call; at most 4 are admitted at once"):
            asyncio.run(one_more(5))  # never admissible: not a "retry later"
        asyncio.run(one_more(1))
    finally:
        stream.cancel()
    assert manager.inflight() == 0


def test_a_request_is_checked_and_tokenized_once(manager, tiny_hf, monkeypatch):
    backend = manager.get(tiny_hf)
    calls = {"check": 0, "tokenize": 0}
    check, prompt_ids = backend.check_request, backend.tokenizer.prompt_ids

    def counted_check(request):
        calls["check"] += 1
        check(request)

    def counted_ids(request):
        calls["tokenize"] += 1
        return prompt_ids(request)

    monkeypatch.setattr(backend, "check_request", counted_check)
    monkeypatch.setattr(backend.tokenizer, "prompt_ids", counted_ids)
    [prepared] = [backend.prepare(r) for r in build_requests("Hello", SamplingParams(max_tokens=2))]
    assert prepared.prompt_token_ids and backend.prepare(prepared) is prepared
    [c] = asyncio.run(_collect(manager, [prepared], tiny_hf))
    assert c.completion_tokens == 2 and calls == {"check": 1, "tokenize": 1}
    assert manager.generate("Hello", SamplingParams(max_tokens=2), backend=tiny_hf)[0].completion_tokens == 2
    assert calls == {"check": 2, "tokenize": 2}  # a plain request: prepared by the manager, once


async def _collect(manager, requests, backend):
    from jupyter_llm.completions import CompletionBuilder

    builder = CompletionBuilder(requests, "hf", "")
    async for event in manager.astream(requests, backend):
        builder.add(event)
    return builder.completions()


def test_a_caller_bound_on_requests_in_flight(manager, tiny_hf):
    long = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
    stream = manager.stream(["a"], long, backend=tiny_hf)
    try:
        next(stream)

        async def one_more(limit):
            async for _ in manager.astream(build_requests("b", SamplingParams(max_tokens=1)), tiny_hf, limit):
                pass

        with pytest.raises(QueueFullError, match="busy: 1 samples in flight and 1 asked for, the limit is 1"):
            asyncio.run(one_more(1))
        asyncio.run(one_more(None))  # the manager's own bound (256) admits it
    finally:
        stream.cancel()


def test_stats_count_tokens(manager, tiny_hf):
    before = manager.get(tiny_hf).stats()["tokens_generated"]
    manager.generate(["a", "b"], SamplingParams(max_tokens=4, ignore_eos=True), backend=tiny_hf)
    stats = manager.get(tiny_hf).stats()
    assert stats["tokens_generated"] - before == 8 and stats["running"] == 0 and stats["waiting"] == 0


def test_async_api_from_another_event_loop(manager, tiny_hf):
    async def main():
        events = []
        from jupyter_llm.completions import build_requests as br

        async for event in manager.astream(br("Hello", SamplingParams(max_tokens=3, ignore_eos=True)), tiny_hf):
            events.append(event)
        out = await manager.agenerate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), backend=tiny_hf)
        return events, out

    events, out = asyncio.run(main())
    assert sum(len(e.token_ids) for e in events) == 3 and out[0].completion_tokens == 3


def test_a_failing_step_fails_its_requests_not_the_manager(manager, tiny_hf):
    engine = manager.get(tiny_hf).engine
    original = engine.step

    def broken():
        raise RuntimeError("boom")

    engine.step = broken
    try:
        [c] = manager.generate("Hello", SamplingParams(max_tokens=3), backend=tiny_hf)
    finally:
        engine.step = original
    assert c.finish_reason == "error" and "boom" in c.error
    engine.rows, engine.removed = [], set()
    assert manager.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True),
                            backend=tiny_hf)[0].completion_tokens == 3


def test_process_exits_promptly_without_shutdown(tiny_llama):
    code = textwrap.dedent(f"""
        import jupyter_llm as jl
        m = jl.get_manager()
        m.load("hf", {str(tiny_llama)!r}, progress=False)
        s = m.stream("Hello", jl.SamplingParams(max_tokens=100000, ignore_eos=True))
        next(s)
        print("started", flush=True)
    """)
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout and time.time() - start < 30


def test_shutdown_ends_compute_threads_even_when_the_loop_cannot_stop_them(tiny_llama):
    """A compute thread still inside torch when the interpreter finalizes aborts the process
    ('terminate called without an active exception', from pybind11 re-taking the GIL). Here the
    loop-side stop never ends, so only shutdown's own join can end the thread before exit."""
    m = EngineManager()
    m.load("hf", str(tiny_llama), progress=False)
    backend = m.get()
    backend.stop = lambda: asyncio.sleep(3600)  # a stop on the loop that never finishes
    stream = m.stream("Hello", SamplingParams(max_tokens=100000, ignore_eos=True))
    next(stream)
    m.shutdown(timeout=0.2)
    assert not backend._thread.is_alive(), "shutdown returned with the compute thread still running"


def test_threads_option_is_per_backend(tiny_llama):
    import os

    m = EngineManager()
    try:
        m.load("hf", str(tiny_llama), name="one", threads=1, progress=False)
        m.load("hf", str(tiny_llama), name="two", progress=False)
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for name in ("one", "two", "one"):
            m.generate("Hello", params, backend=name)
            expected = 1 if name == "one" else os.cpu_count()
            assert m.get(name).step_threads == expected
    finally:
        m.shutdown()


def test_a_batch_of_prompts_is_admitted_together(manager, tiny_hf):
    engine = manager.get(tiny_hf).engine
    original = engine._prefill
    batch_sizes = []

    def spy():
        batch_sizes.append(len(engine.waiting))
        return original()

    engine._prefill = spy
    try:
        for _ in range(3):
            manager.generate(["a", "b", "c", "d"], SamplingParams(max_tokens=3, ignore_eos=True), backend=tiny_hf)
    finally:
        del engine._prefill
    assert batch_sizes == [4, 4, 4]


def test_hf_dtype_option(tiny_llama):
    m = EngineManager()
    try:
        info = m.load("hf", str(tiny_llama), dtype="bfloat16", progress=False)
        assert info.dtype == "bfloat16"
        assert str(m.get().hf_model.dtype) == "torch.bfloat16"
        assert m.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True))[0].completion_tokens == 3
    finally:
        m.shutdown()


def test_a_consumer_cancelled_as_its_requests_are_submitted_leaves_nothing_running(monkeypatch):
    """The tick in which astream lets every pump submit its request is inside the cleanup: a
    caller cancelled right then (a client hanging up) does not leave its generation running."""
    from jupyter_llm import backends

    monkeypatch.setitem(backends.BUILTIN, "fake", "server_fake_backend:FakeBackend")
    manager = EngineManager()
    try:
        manager.load("fake", progress=False)
        fake = manager.get("fake")

        async def cancel_at_submission() -> None:
            stream = manager.astream(build_requests("slow", SamplingParams(max_tokens=1000)), "fake")
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)  # astream has created the pumps and yields for them to submit
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            for _ in range(100):  # what is still running after the cancel had every chance to finish
                if manager.inflight() == 0 and fake.running == 0:
                    break
                await asyncio.sleep(0.01)

        manager.submit(cancel_at_submission()).result(timeout=30)
        assert manager.inflight() == 0 and fake.running == 0
    finally:
        manager.shutdown()


@pytest.mark.parametrize("where", ["output", "add"])
def test_a_failure_outside_the_step_fails_its_requests_and_the_thread_serves_on(manager, tiny_hf, monkeypatch,
                                                                                where):
    """An exception in output processing or in taking a request in (outside the engine's step)
    ends the requests in flight with an error; the compute thread keeps serving, /health stays ok."""
    from jupyter_llm.output import SampleOutputProcessor

    backend = manager.get(tiny_hf)
    if where == "output":
        monkeypatch.setattr(SampleOutputProcessor, "append", lambda *a: 1 / 0)
    else:
        monkeypatch.setattr(backend.engine, "add", lambda seq: 1 / 0)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    [failed] = manager.submit(manager.agenerate("Hello", params, backend=tiny_hf)).result(timeout=60)
    assert failed.finish_reason == "error" and "ZeroDivisionError" in failed.error
    assert backend.health() is None
    monkeypatch.undo()
    backend.engine.rows, backend.engine.removed = [], set()
    [ok] = manager.submit(manager.agenerate("Hello", params, backend=tiny_hf)).result(timeout=60)
    assert ok.finish_reason == "length" and ok.completion_tokens == 3


def test_a_compute_thread_that_dies_anyway_fails_its_requests_and_refuses_new_ones(tiny_llama, monkeypatch):
    """What no handler takes (SystemExit) ends the compute thread: the requests in flight end with
    an error instead of waiting forever, /health says why, and new requests are refused at once."""
    from jupyter_llm.output import SampleOutputProcessor

    def exits(*args):
        raise SystemExit("gone")

    fresh = EngineManager()
    try:
        fresh.load("hf", str(tiny_llama), name="tiny", progress=False)
        backend = fresh.get("tiny")
        monkeypatch.setattr(SampleOutputProcessor, "append", exits)
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        [failed] = fresh.submit(fresh.agenerate("Hello", params, backend="tiny")).result(timeout=60)
        assert failed.finish_reason == "error" and "SystemExit: gone" in failed.error
        backend._thread.join(10)
        assert "compute thread of backend 'hf' failed" in backend.health()
        monkeypatch.undo()
        with pytest.raises(BackendError, match="compute thread"):
            fresh.submit(fresh.agenerate("Hello", params, backend="tiny")).result(timeout=10)
    finally:
        fresh.shutdown()
