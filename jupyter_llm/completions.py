"""From prompts to GenerationRequests, and from TokenEvents to Completions: what every entry point
(magics, widgets, server, bench) builds before a request and receives after it.

`CompletionBuilder` assembles what a consumer receives, for every backend including remote
ones: it is the consumer's view of the events, not the engine's record of a sample's tokens
(an in-process engine's sequence owns those).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Completion, GenerationRequest, Message, SamplingParams, TokenEvent

Prompt = str | list[Message]


def build_requests(prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                   chat: bool = False, system: str | None = None) -> list[GenerationRequest]:
    """Requests for one prompt or a batch. With chat, a string becomes a user turn and a list
    of messages is sent as it is (a multi-turn conversation); `system` goes first."""
    params = params or SamplingParams()
    is_conversation = isinstance(prompts, list) and bool(prompts) and all(isinstance(m, dict) for m in prompts)
    batch: list[Prompt] = [prompts] if isinstance(prompts, str) or is_conversation else list(prompts)
    if not batch:
        raise ParamError("no prompt given")
    requests = []
    for prompt in batch:
        if not chat and isinstance(prompt, str):
            requests.append(GenerationRequest(prompt=prompt, params=params))
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}] + messages
        requests.append(GenerationRequest(messages=messages, params=params))
    return requests


class CompletionBuilder:
    """Folds the events of several requests into Completions, timing them where they arrive.

    With `keep_output=False` it keeps counts only (tokens, finish reasons, errors, time to first
    token): for a consumer that passes the output on as it arrives, so that a long answer costs
    it nothing per token."""

    def __init__(self, requests: list[GenerationRequest], backend: str, model: str, keep_output: bool = True):
        self.started = time.monotonic()
        self.keep_output = keep_output
        self._slots: dict[tuple[str, int], Completion] = {}
        self._order: list[tuple[str, int]] = []
        self._json = {r.id for r in requests if r.params.structured is not None and r.params.structured.is_json}
        for prompt_index, request in enumerate(requests):
            keeps_logprobs = keep_output and request.params.logprobs is not None
            for index in range(request.params.n):
                key = (request.id, index)
                self._order.append(key)
                self._slots[key] = Completion(text="", token_ids=[], prompt_tokens=0, finish_reason="",
                                              prompt_index=prompt_index, index=index, request_id=request.id,
                                              backend=backend, model=model, logprobs=[] if keeps_logprobs else None)

    def add(self, event: TokenEvent) -> None:
        c = self._slots[(event.request_id, event.index)]
        now = event.timestamp - self.started
        if event.token_ids:
            if c.timings.ttft is None:
                c.timings.ttft = now
            c.completion_tokens += len(event.token_ids)
            if self.keep_output:
                c.timings.token_times.extend([now] * len(event.token_ids))
                c.token_ids.extend(event.token_ids)
        if self.keep_output:
            c.text += event.text
            if event.logprobs and c.logprobs is not None:
                c.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            c.finish_reason = event.finish_reason
            c.error = event.error
            c.stop_reason = event.stop_reason
            c.prompt_tokens = event.prompt_tokens or c.prompt_tokens
            c.timings.total = now
            if c.finish_reason == "stop" and self.keep_output and event.request_id in self._json:
                c.parsed = _parsed(c.text)

    def cancel_unfinished(self) -> None:
        now = time.monotonic() - self.started
        for c in self._slots.values():
            if not c.finish_reason:
                c.finish_reason, c.timings.total = "cancelled", now

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self._slots.values())

    def completions(self) -> list[Completion]:
        """In prompt order, the n samples of a prompt next to each other."""
        return [self._slots[key] for key in self._order]


def _parsed(text: str) -> object:
    """A JSON-constrained answer's value; None if it does not parse (a stop string cut it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
