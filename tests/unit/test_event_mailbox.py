"""EventMailbox folds what a lagging consumer has not taken, at every hand-over between the engine
and a caller: the in-process backend's per-request mailbox, the manager's merge of a batch, and the
bridge to a caller on another loop."""
import asyncio
import time

import pytest

from jupyter_llm.completions import build_requests
from jupyter_llm.event_mailbox import EventMailbox
from jupyter_llm.schema import SamplingParams, TokenEvent, TokenLogprob


def token(index: int, text: str, token_id: int, finish: str | None = None, logprob: bool = False) -> TokenEvent:
    entries = [TokenLogprob(token_id, text, -1.0)] if logprob else None
    return TokenEvent("r", index, text=text, token_ids=[token_id], logprobs=entries, finish_reason=finish,
                      prompt_tokens=3 if finish else None)


def test_a_sample_not_taken_yet_is_one_event_with_all_its_output_in_order():
    async def main():
        box = EventMailbox()
        first = token(0, "a", 1, logprob=True)
        box.put(first)
        box.put(token(1, "x", 9))
        box.put(token(0, "b", 2, logprob=True))
        box.put(token(0, "c", 3, finish="length", logprob=True))
        assert len(box) == 2  # one pending event per sample, however many tokens
        merged, other = await box.get(), await box.get()
        return first, merged, other

    first, merged, other = asyncio.run(main())
    assert (merged.index, merged.text, merged.token_ids) == (0, "abc", [1, 2, 3])
    assert [e.token_id for e in merged.logprobs] == [1, 2, 3]
    assert (merged.finish_reason, merged.prompt_tokens, merged.timestamp) == ("length", 3, first.timestamp)
    assert (first.text, first.token_ids, len(first.logprobs)) == ("a", [1], 1)  # the producer's event is untouched
    assert (other.index, other.text) == (1, "x")


def test_get_waits_for_output_then_ends_when_every_producer_closed_and_raises_a_failure_last():
    async def main():
        box = EventMailbox(producers=2)
        waiting = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        box.put(token(0, "a", 1))
        assert (await waiting).text == "a"
        box.close()
        box.put(token(0, "b", 2))
        box.close()
        assert (await box.get()).text == "b" and await box.get() is None
        failing = EventMailbox()
        failing.put(token(0, "c", 3))
        failing.fail(ValueError("boom"))
        assert (await failing.get()).text == "c"
        with pytest.raises(ValueError, match="boom"):
            await failing.get()

    asyncio.run(main())


LONG = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0)


async def _lagging(events, done):
    """The first event, then nothing until the work is done, then the rest."""
    taken = [await anext(events)]
    deadline = time.monotonic() + 30
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the events still crossing between loops land
    return taken + [event async for event in events]


@pytest.mark.parametrize("stage", ["backend", "manager", "bridge"])
def test_a_consumer_that_lags_gets_the_output_folded_not_one_event_per_token(manager, tiny_hf, stage):
    backend = manager.get(tiny_hf)
    [expected] = manager.generate("Hello", LONG, backend=tiny_hf)

    def idle():
        return manager.inflight() == 0 and backend.stats()["running"] == 0 and backend.stats()["waiting"] == 0

    requests = build_requests("Hello", LONG)
    if stage == "backend":
        events = manager.submit(_lagging(backend.generate(requests[0]), idle)).result(60)
    elif stage == "manager":
        events = manager.submit(_lagging(manager.astream(requests, tiny_hf), idle)).result(60)
    else:  # from a caller's own loop, across the bridge
        events = asyncio.run(_lagging(manager.astream(requests, tiny_hf), idle))
    assert len(events) <= 3, [e.text for e in events]  # not one per token
    assert "".join(e.text for e in events) == expected.text
    assert [t for e in events for t in e.token_ids] == expected.token_ids and len(expected.token_ids) == 40
    assert events[-1].finish_reason == "length"
