"""`EventMailbox`: the hand-over of TokenEvents from a producer to one asyncio consumer that never
makes the producer wait and never grows with the consumer's lag. Events of a sample that the
consumer has not taken yet are folded into one (as vLLM's RequestOutputCollector does), so a
consumer that reads slowly, or not at all, costs the output it has not taken, nothing more: no
queue of per-token events builds up between the engine and an HTTP client that stopped reading.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import replace

from jupyter_llm.schema import TokenEvent


class _Backlog:
    """The events of one sample not taken yet, folded: their text, token ids and logprobs in
    order, the first one's time (when its output began), the last one's ending."""

    __slots__ = ("first", "last", "logprobs", "texts", "token_ids")

    def __init__(self, first: TokenEvent):
        self.first = self.last = first
        self.texts = [first.text]
        self.token_ids = list(first.token_ids)
        self.logprobs = None if first.logprobs is None else list(first.logprobs)

    def add(self, event: TokenEvent) -> None:
        self.last = event
        self.texts.append(event.text)
        self.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(event.logprobs)

    def event(self) -> TokenEvent:
        last = self.last
        return replace(self.first, text="".join(self.texts), token_ids=self.token_ids, logprobs=self.logprobs,
                       finish_reason=last.finish_reason, error=last.error, prompt_tokens=last.prompt_tokens,
                       stop_reason=last.stop_reason)


class EventMailbox:
    """Events put by `producers` producers, taken in order by one consumer on the same loop.

    `put` never waits: an event joins its sample's pending one (one per sample, oldest first).
    `get` returns the next event; after every producer called `close`, and once nothing is
    pending, it returns None. A producer's `fail(error)` makes `get` raise it once no event is
    pending. Loop-affine: from another thread, put via `call_soon_threadsafe`.
    """

    def __init__(self, producers: int = 1):
        self._pending: OrderedDict[tuple[str, int], TokenEvent | _Backlog] = OrderedDict()
        self._open = producers
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, event: TokenEvent) -> None:
        key = (event.request_id, event.index)
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = event
        else:
            if isinstance(pending, TokenEvent):
                pending = self._pending[key] = _Backlog(pending)
            pending.add(event)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._ready.set()

    def close(self) -> None:
        """One producer is done."""
        self._open -= 1
        self._ready.set()

    def __len__(self) -> int:
        """The samples with output pending."""
        return len(self._pending)

    async def get(self) -> TokenEvent | None:
        while not self._pending and self._error is None and self._open > 0:
            self._ready.clear()
            await self._ready.wait()
        if self._pending:
            _, pending = self._pending.popitem(last=False)
            return pending if isinstance(pending, TokenEvent) else pending.event()
        if self._error is not None:
            raise self._error
        return None
