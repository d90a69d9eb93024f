"""One playground generation: the same request on one or more backends, consumed on the
manager's loop, folded into Completions and handed to the widget as batched messages.

Messages (Python -> browser), all tagged with the run id:
  {"type": "start", "columns": [{"backend", "model", "sample"}, ...]}
  {"type": "tokens", "items": [{"c": column, "t": text, "k": token count, "p": [token, ...]}
                               | {"c": column, "finish": {...}}, ...]}
  {"type": "end", "error": str}
where a token is {"t": text, "p": probability, "alt": [[text, probability], ...]}.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_llm.completions import CompletionBuilder
from jupyter_llm.manager import EngineManager
from jupyter_llm.schema import Completion, GenerationRequest, TokenEvent, TokenLogprob

FLUSH_INTERVAL = 0.05  # seconds: at most ~20 widget messages a second, whatever the token rate

Message = dict[str, Any]


@dataclass
class Lane:
    """One backend's share of a generation: one request, its n samples as columns."""

    backend: str
    request: GenerationRequest
    first_column: int
    builder: CompletionBuilder
    # Tokens (and their logprobs) whose text has not arrived yet: held back by the
    # detokenizer (a partial UTF-8 character) or by a possible stop string.
    pending: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    pending_tokens: dict[int, int] = field(default_factory=dict)
    reported: bool = False  # its columns' footers were sent


def _token(lp: TokenLogprob) -> dict[str, Any]:
    return {"t": lp.token, "p": round(math.exp(lp.logprob), 5),
            "alt": [[text, round(math.exp(value), 5)] for _, text, value in lp.top]}


def _finish(c: Completion) -> dict[str, Any]:
    return {"reason": c.finish_reason, "error": c.error or "", "tokens": c.completion_tokens,
            "ttft": c.timings.ttft, "tps": c.timings.decode_tokens_per_s}


class Generation:
    """Runs on the manager's loop (`start`); `stop` and `done` work from any thread."""

    def __init__(self, manager: EngineManager, run_id: int, requests: list[tuple[str, GenerationRequest]],
                 send: Callable[[Message], None], on_end: Callable[[Generation], None]):
        self.manager = manager
        self.run_id = run_id
        self.lanes: list[Lane] = []
        self.columns: list[dict[str, Any]] = []
        for name, request in requests:
            backend = manager.get(name)
            self.lanes.append(Lane(name, request, len(self.columns),
                                   CompletionBuilder([request], backend.kind, backend.model_name)))
            self.columns += [{"backend": name, "model": backend.model_name, "sample": i}
                             for i in range(request.params.n)]
        self.errors: list[str] = []
        self.done = threading.Event()
        self._send = send
        self._on_end = on_end
        self._items: list[Message] = []
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    @property
    def completions(self) -> list[Completion]:
        return [c for lane in self.lanes for c in lane.builder.completions()]

    def start(self) -> None:
        self._send({"type": "start", "run": self.run_id, "columns": self.columns})
        self.manager.submit(self._main())

    def stop(self) -> None:
        """Cancel every request, from any thread. Cancelling a lane on the manager's loop closes
        the manager's stream, which cancels the request inside its backend; unlike
        `manager.cancel(request_id)` it also covers a request that has not been admitted yet."""
        if not self.done.is_set():
            self.manager.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    async def _main(self) -> None:
        try:
            if not self._stopped:
                self._tasks = [asyncio.ensure_future(self._lane(lane)) for lane in self.lanes]
            waiting = set(self._tasks)
            while waiting:
                _, waiting = await asyncio.wait(waiting, timeout=FLUSH_INTERVAL)
                self._flush()
        finally:
            for lane in self.lanes:
                if not lane.reported:  # stopped before its task ran
                    lane.builder.cancel_unfinished()
                    self._report(lane)
            self._flush()
            self._send({"type": "end", "run": self.run_id, "error": "; ".join(self.errors)})
            try:
                self._on_end(self)
            finally:
                self.done.set()

    async def _lane(self, lane: Lane) -> None:
        try:
            async for event in self.manager.astream([lane.request], lane.backend):
                lane.builder.add(event)
                self._add(lane, event)
        except asyncio.CancelledError:
            lane.builder.cancel_unfinished()
        except Exception as error:  # noqa: BLE001 shown in the widget, never raised into a comm handler
            self.errors.append(f"{lane.backend}: {error}")
            for c in lane.builder.completions():
                if not c.finish_reason:
                    c.finish_reason, c.error = "error", str(error)
        self._report(lane)

    def _report(self, lane: Lane) -> None:
        """Queue the footers of a finished lane and note its errors."""
        lane.reported = True
        for c in lane.builder.completions():
            if c.error and not any(c.error in e for e in self.errors):
                self.errors.append(f"{lane.backend}: {c.error}")
            self._items.append({"c": lane.first_column + c.index, "finish": _finish(c)})

    def _add(self, lane: Lane, event: TokenEvent) -> None:
        held = lane.pending.setdefault(event.index, [])
        held.extend(event.logprobs or [])
        count = lane.pending_tokens.get(event.index, 0) + len(event.token_ids)
        # Text carries the tokens held so far; an empty final event (EOS, a matched stop
        # string) still shows their logprobs, so that the end of the output can be inspected too.
        if event.text or (event.finish_reason and held):
            self._items.append({"c": lane.first_column + event.index, "t": event.text, "k": count,
                                "p": [_token(lp) for lp in held]})
            lane.pending[event.index], count = [], 0
        lane.pending_tokens[event.index] = count

    def _flush(self) -> None:
        if self._items:
            items, self._items = self._items, []
            self._send({"type": "tokens", "run": self.run_id, "items": items})
