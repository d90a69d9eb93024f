"""Reading an upstream's SSE stream into our TokenEvents: `StreamReader` splits a stream's
chunks among its samples (a server-side n interleaves them), `SampleReader` turns one sample's
deltas into events, matching stop strings locally."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from jupyter_llm.backends.openai.resilience import UPSTREAM
from jupyter_llm.backends.openai.wire import Delta, parse_chunk, sse_payload
from jupyter_llm.output import StopMatcher
from jupyter_llm.schema import GenerationRequest, TokenEvent, TokenLogprob

if TYPE_CHECKING:
    from jupyter_llm.backends.openai.backend import OpenAIBackend

log = logging.getLogger(__name__)
FINISH = {"length": "length", "abort": "cancelled", "cancelled": "cancelled"}


class StreamReader:
    """Turns the SSE lines of one HTTP request into the TokenEvents of its samples: each choice's
    delta goes to its sample's reader; [DONE], an error event or a broken stream ends them all."""

    def __init__(self, backend: OpenAIBackend, request: GenerationRequest, samples: range,
                 prompt_tokens: int | None):
        self.backend = backend
        self.chat = request.is_chat
        self.top = request.params.logprobs or 0
        self.samples = [SampleReader(backend, request, i, prompt_tokens) for i in samples]

    @property
    def done(self) -> bool:
        return all(sample.done for sample in self.samples)

    def feed(self, line: str) -> list[TokenEvent]:
        payload = sse_payload(line)
        if payload is None:
            return []
        if payload == "[DONE]":
            return [s.finish(s.server_finish or "stop") for s in self.samples if not s.done]
        if "error" in payload and not payload.get("choices"):  # an error in the middle of a stream
            error = payload["error"]
            log.warning("%s sent an error mid-stream: %s", self.backend.url,
                        error.get("message", error) if isinstance(error, dict) else error)
            return self.finish("error", f"{UPSTREAM} failed mid-stream")
        choices, prompt_tokens = parse_chunk(payload, self.chat, self.top)
        if prompt_tokens is not None:
            for sample in self.samples:
                sample.prompt_tokens = prompt_tokens
        events = []
        for index, delta in choices:  # the server numbers this request's choices from 0
            if 0 <= index < len(self.samples) and not self.samples[index].done:
                events += self.samples[index].feed(delta)
        return events

    def finish(self, reason: str | None, error: str | None = None) -> list[TokenEvent]:
        return [sample.finish(reason, error) for sample in self.samples if not sample.done]


class SampleReader:
    """The deltas of one sample as TokenEvents: ids, logprobs, stop strings, finish."""

    def __init__(self, backend: OpenAIBackend, request: GenerationRequest, index: int, prompt_tokens: int | None):
        self.backend = backend
        self.request_id = request.id
        self.index = index
        self.stops = StopMatcher(request.params.stop)
        self.prompt_tokens = prompt_tokens
        self.server_finish: str | None = None
        self.server_stop: str | None = None  # the stop string the server stopped at, when it says
        self.done = False

    def feed(self, delta: Delta) -> list[TokenEvent]:
        if delta.finish_reason:
            self.server_finish = FINISH.get(delta.finish_reason, "stop")
            self.server_stop = delta.stop_reason
        return self._token_event(delta)

    def _token_event(self, delta: Delta) -> list[TokenEvent]:
        event = TokenEvent(self.request_id, self.index)
        event.token_ids = self._ids(delta)
        if delta.logprobs is not None:
            event.logprobs = self._logprobs(delta, event.token_ids)
        event.text, stop = self.stops.feed(delta.text)
        self.backend.meter.add(len(event.token_ids) or (1 if delta.text else 0))
        if stop is not None:
            event.stop_reason = stop
            self._finish_event(event, "stop")
            return [event]
        return [event] if (event.text or event.token_ids) else []

    def _ids(self, delta: Delta) -> list[int]:
        if delta.token_ids is not None:
            return delta.token_ids
        tokenizer = self.backend.tokenizer
        if tokenizer is None:
            return []
        if delta.logprobs:  # one entry per generated token
            return [self.backend.token_id(token) for token, _, _ in delta.logprobs]
        return tokenizer.encode(delta.text, add_special_tokens=False) if delta.text else []

    def _logprobs(self, delta: Delta, ids: list[int]) -> list[TokenLogprob]:
        assert delta.logprobs is not None
        token_id = self.backend.token_id
        exact = len(ids) == len(delta.logprobs)
        return [TokenLogprob(ids[i] if exact else token_id(token), token, value,
                             [(token_id(alt), alt, alt_value) for alt, alt_value in top])
                for i, (token, value, top) in enumerate(delta.logprobs)]

    def finish(self, reason: str | None, error: str | None = None) -> TokenEvent:
        """The last event: what the stop matcher held back, the finish reason, the prompt length."""
        event = TokenEvent(self.request_id, self.index, text=self.stops.flush(), error=error)
        if reason is None:  # the stream ended without [DONE]
            reason = self.server_finish or "error"
            if reason == "error":
                log.warning("%s closed the stream before the end of the answer", self.backend.url)
                event.error = f"{UPSTREAM} closed the stream before the end of the answer"
        if reason == "stop":
            event.stop_reason = self.server_stop
        self._finish_event(event, reason)
        return event

    def _finish_event(self, event: TokenEvent, reason: str) -> None:
        event.finish_reason = reason
        event.prompt_tokens = self.prompt_tokens or 0
        self.done = True
