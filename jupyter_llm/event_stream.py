"""`EventStream`: the sync iterator that magics and the CLI read a batch's events from, while the
work runs on the manager's loop."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jupyter_llm.completions import CompletionBuilder
from jupyter_llm.schema import Completion, GenerationRequest, TokenEvent

if TYPE_CHECKING:  # the manager imports this module
    from jupyter_llm.manager import EngineManager


class EventStream:
    """A sync iterator over the events of a batch of requests, running on the manager's loop.

    Iterating blocks until the next event; `cancel()` (or a KeyboardInterrupt while
    iterating) stops every request inside its backend. `completions` holds the results,
    also partial ones after a cancel.
    """

    _END = object()

    def __init__(self, manager: EngineManager, requests: list[GenerationRequest], backend: str | None):
        self.manager = manager
        self.requests = requests
        self._events: queue.Queue[Any] = queue.Queue()
        target = manager.get(backend)
        self.builder = CompletionBuilder(requests, target.kind, target.model_name)
        self.backend_name = manager.resolve_name(backend)
        self._started = False  # the pump's body ran (a pump cancelled before its first step never does)
        self._finished = threading.Event()  # set by a started pump once its requests have left the manager
        self._future = manager.submit(self._pump())

    async def _pump(self) -> None:
        try:
            self._started = True
            async for event in self.manager.astream(self.requests, backend=self.backend_name):
                self._events.put(event)
        except BaseException as error:  # noqa: BLE001 handed to the iterating thread
            self._events.put(error)
        finally:
            self._events.put(self._END)
            self._finished.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        try:
            item = self._events.get()
        except KeyboardInterrupt:
            self.cancel()
            raise
        if item is self._END:
            self._events.put(self._END)
            raise StopIteration
        if isinstance(item, BaseException):
            if isinstance(item, asyncio.CancelledError):
                raise StopIteration
            raise item
        self.builder.add(item)
        return item

    def cancel(self, timeout: float = 30.0) -> None:
        """Stop every request of this stream and keep what was generated. Returns once its
        requests have left the manager, so their admission slots are free for the next call
        (waits at most `timeout` s; never waits when called on the manager's own loop)."""
        self._future.cancel()
        self.builder.cancel_unfinished()
        if threading.current_thread() is self.manager._thread or not self.manager.loop.is_running():
            return
        # The loop runs callbacks in order: once it has run this one, the pump has either
        # started (and is unwinding its requests) or never will.
        barrier = threading.Event()
        self.manager.loop.call_soon_threadsafe(barrier.set)
        if barrier.wait(timeout) and self._started:
            self._finished.wait(timeout)

    def close(self) -> None:
        if not self.builder.done:
            self.cancel()

    @property
    def completions(self) -> list[Completion]:
        return self.builder.completions()

    def wait(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions
