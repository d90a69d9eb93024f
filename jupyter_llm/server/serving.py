"""From an OpenAI request to the manager's GenerationRequests and back.

Everything that can be refused is refused before a byte of the answer goes out: the size
(--max-messages, --max-prompt-chars), the model, the sampling parameters, the context length
(tokenized with the backend's tokenizer, once, off the event loop for long requests: the
prompt ids travel down with the request; the openai backend without a local tokenizer leaves
that check to its server), the backend's capabilities (checked once, by `Backend.prepare`),
the request's token budget (prompt + max_tokens x n, --max-request-tokens), and admission (the
manager's bound on samples, which --max-queue sets). A stream starts once its first event arrived, so that even errors
raised inside the backend get a proper status code. A client that goes away cancels its
requests inside the backend (sse-starlette notices it while streaming; a watcher on `receive`
notices it otherwise), and so does one that stops reading a stream for --stream-write-timeout
seconds; what it has not taken meanwhile is folded into one pending event per sample
(event_mailbox.py), and its builder keeps counts only.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jupyter_llm.backends.base import Backend
from jupyter_llm.completions import CompletionBuilder
from jupyter_llm.errors import ConstraintError, NoBackendError, ParamError, QueueFullError
from jupyter_llm.schema import Completion, GenerationRequest, PreparedRequest, SamplingParams, TokenEvent
from jupyter_llm.server.disconnect import ClientGone, until_disconnected
from jupyter_llm.server.failures import backend_failure, sample_failure
from jupyter_llm.server.metrics import RequestTracker, ServerMetrics
from jupyter_llm.server.protocol import (
    APIError,
    ChatRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    SamplingFields,
    message_text,
    usage,
    user_error,
)
from jupyter_llm.server.security import KeyChecker, cache_salt
from jupyter_llm.server.settings import ServerSettings
from jupyter_llm.server.sse import StreamResponse, sse
from jupyter_llm.server.structured_fields import constraint_field, structured_output
from jupyter_llm.server.tool_calls import ToolChatShape, history, tool_use
from jupyter_llm.structured import StructuredOutput

log = logging.getLogger(__name__)

_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop", "n", "ignore_eos")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions


@dataclass
class Job:
    """One HTTP generation request, validated and ready to run."""

    shape: CompletionShape | ChatShape
    backend: Backend
    name: str  # the backend's name in the manager, echoed as `model`
    requests: list[PreparedRequest]
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.shape.id_prefix + uuid.uuid4().hex[:24]

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self.shape.chunk_object if chunk else self.shape.object,
                "created": self.created, "model": self.name, "choices": choices}

    def usage(self, completions: list[Completion]) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in completions if c.index == 0)  # once per prompt, not per sample
        return usage(prompt, sum(c.completion_tokens for c in completions))


class Generation:
    """The two generation endpoints of one app. Admission is the manager's, bounded by --max-queue."""

    def __init__(self, manager: Any, settings: ServerSettings, metrics: ServerMetrics):
        self.manager, self.settings, self.metrics = manager, settings, metrics
        self.keys = KeyChecker(settings.api_keys)
        self.inflight: set[str] = set()  # ids of this server's requests in flight (cancelled at shutdown)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        chars = sum(map(len, prompts))
        self._check_size(chars, "prompt")
        job = await _validate(self._completion_job, body, chars)
        return await self._run(self._salted(job, request, body), request)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        chars = sum(len(message_text(m.content or "", i)) for i, m in enumerate(body.messages))
        chars += len(json.dumps(body.tools)) if body.tools else 0  # their descriptions join the prompt
        self._check_size(chars, "messages")
        # A chat template renders text around every message (roles, separators), even an empty one.
        work = chars + TEMPLATE_CHARS_PER_MESSAGE * len(body.messages)
        return await self._run(self._salted(await _validate(self._chat_job, body, work), request, body), request)

    def _check_size(self, chars: int, param: str) -> None:
        if chars > self.settings.max_prompt_chars:
            raise APIError(400, f"the {param} has {chars} characters; this server accepts at most "
                                f"{self.settings.max_prompt_chars} per request", param=param,
                           code="string_above_max_length")

    def _salted(self, job: Job, request: Request, body: SamplingFields) -> Job:
        salt = cache_salt(request.scope, self.keys, body.cache_salt)
        for prepared in job.requests:
            prepared.cache_salt = salt
        return job

    def cancel_all(self) -> None:
        for request_id in list(self.inflight):
            self.manager.cancel(request_id)

    # --- validation (for long prompts in a worker thread: see _validate) ----------------------
    def _completion_job(self, body: CompletionRequest) -> Job:
        name, backend = self._backend(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported")
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is not supported by this server (use n)", param="best_of",
                           code="unsupported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [self._tokenize(backend, GenerationRequest(prompt=p), "prompt") for p in prompts]
        params = self._params(body, backend, [None if i is None else len(i) for i in ids],
                              ("max_tokens", body.max_tokens), COMPLETION_DEFAULT_MAX_TOKENS, body.logprobs)
        return self._job(CompletionShape(), name, backend, body,
                         [GenerationRequest(prompt=p, params=params, prompt_token_ids=i) for p, i in zip(prompts, ids)])

    def _chat_job(self, body: ChatRequest) -> Job:
        name, backend = self._backend(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        use = tool_use(body)
        messages = use.messages(history(body))
        ids = self._tokenize(backend, GenerationRequest(messages=messages), "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        limit = ("max_completion_tokens", body.max_completion_tokens) if body.max_completion_tokens is not None \
            else ("max_tokens", body.max_tokens)
        params = self._params(body, backend, [None if ids is None else len(ids)], limit, None, logprobs,
                              use.constraint())
        shape = ToolChatShape(use) if use.offered else ChatShape()
        return self._job(shape, name, backend, body,
                         [GenerationRequest(messages=messages, params=params, prompt_token_ids=ids)])

    def _job(self, shape: CompletionShape | ChatShape, name: str, backend: Backend, body: SamplingFields,
             requests: list[GenerationRequest]) -> Job:
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias", code="unsupported")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                           code="invalid_value")
        try:
            prepared = [backend.prepare(r) for r in requests]
        except ConstraintError as error:  # compiled for the backend's tokenizer, after the fields' checks
            raise APIError(400, str(error), param=constraint_field(body), code="invalid_value") from None
        except ParamError as error:
            raise user_error(error) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # vLLM's return_token_ids; a tools answer is reshaped into calls, whose tokens it does not list
        token_ids = bool(body.return_token_ids) and not isinstance(shape, ToolChatShape)
        return Job(shape, backend, name, prepared, prepared[0].params.n, bool(body.stream), include_usage, token_ids)

    def _backend(self, model: str | None) -> tuple[str, Backend]:
        names = self.manager.names()
        if not names:
            raise APIError(503, "no model is loaded yet; load one in the notebook with %llm_backend",
                           type="server_error", code="model_not_loaded")
        if model is None:
            name = self.manager.default or names[0]
        elif model in names:
            name = model
        else:  # also accept the model's own name when one backend serves it
            matches = [n for n in names if self._get(n).model_name == model]
            if len(matches) > 1:
                raise APIError(400, f"several backends serve `{model}` ({', '.join(matches)}): name one of them",
                               param="model", code="ambiguous_model")
            if not matches:
                raise APIError(404, f"The model `{model}` does not exist; loaded: {', '.join(names)}",
                               param="model", code="model_not_found")
            name = matches[0]
        return name, self._get(name)

    def _get(self, name: str) -> Backend:
        try:
            return self.manager.get(name)
        except NoBackendError as error:  # unloaded meanwhile
            raise backend_failure(error) from None

    @staticmethod
    def _tokenize(backend: Backend, request: GenerationRequest, param: str) -> list[int] | None:
        """The request's prompt ids by the backend's tokenizer: counted here, then handed down.
        None where the backend leaves counting to the server it forwards to."""
        try:
            ids = backend.prompt_ids(request)
        except Exception as error:  # noqa: BLE001 e.g. lone surrogates, a chat template that refuses the roles
            raise APIError(400, f"cannot tokenize the {param}: {error}", param=param, code="invalid_value") from None
        if ids == [] or (ids is None and request.prompt == ""):
            raise APIError(400, f"the {param} is empty", param=param, code="invalid_value")
        return ids

    def _params(self, body: SamplingFields, backend: Backend, lengths: list[int | None],
                limit: tuple[str, int | None], default: int | None, logprobs: int | None,
                tool_constraint: StructuredOutput | None = None) -> SamplingParams:
        """SamplingParams for the body; `limit` is (the field that gave max_tokens, its value);
        `lengths` are the prompts' token counts (None: not known here, the backend's server checks them);
        `tool_constraint`: the schema a required or named tool call is sampled under."""
        context = backend.max_model_len
        limit_name, max_tokens = limit
        longest = max((n for n in lengths if n is not None), default=0)
        where = "prompt" if isinstance(body, CompletionRequest) else "messages"
        if longest >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, and the {where} has "
                                f"{longest} tokens. Please reduce the length of the {where}.",
                           param=where, code="context_length_exceeded")
        n, budget = body.n or 1, self.settings.max_request_tokens
        counted = sum(k for k in lengths if k is not None)  # prompts not counted here cost the upstream's
        if max_tokens is None:  # the default stays inside the request's token budget too
            affordable = (budget - counted) // (n * len(lengths))
            max_tokens = max(1, min(default or context - longest, context - longest, self.settings.max_tokens,
                                    affordable))
        elif longest + max_tokens > context:
            parts = f" ({longest} in the {where}, {max_tokens} in the completion)" if longest else ""
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{longest + max_tokens} tokens{parts}. Please reduce the length of the {where} "
                                f"or completion.", param=limit_name, code="context_length_exceeded")
        cost = counted + max_tokens * n * len(lengths)
        if cost > budget:
            prompts = f" x {len(lengths)} prompts" if len(lengths) > 1 else ""
            raise APIError(400, f"This request would cost {cost} tokens ({counted} in the {where}, {max_tokens} "
                                f"max_tokens x n {n}{prompts} in the completions); this server allows at most "
                                f"{budget} tokens per request. Please lower max_tokens, n or the number of prompts.",
                           param=limit_name if max_tokens > 1 else where, code="request_too_large")
        values: dict[str, Any] = {k: getattr(body, k) for k in _SAMPLING_NAMES if getattr(body, k) is not None}
        structured = structured_output(body)
        if structured is not None and tool_constraint is not None:
            raise APIError(400, "tool_choice required or a named function already constrains the answer: drop "
                                "response_format or the structured output field", param="tool_choice",
                           code="invalid_value")
        values.update(max_tokens=max_tokens, logprobs=logprobs, structured=structured or tool_constraint)
        try:
            return SamplingParams(**values)
        except ParamError as error:
            raise user_error(error) from None

    # --- running ---------------------------------------------------------------------------
    async def _run(self, job: Job, request: Request) -> Response:
        self.inflight.update(r.id for r in job.requests)
        tracker = self.metrics.tracker(job.name)
        # a stream passes its output on as it comes: its builder keeps counts, not the text
        builder = CompletionBuilder(job.requests, job.backend.kind, job.backend.model_name, keep_output=not job.stream)
        stream = self.manager.astream(job.requests, job.name, max_queue=self.settings.max_queue)
        closed = False

        async def close(outcome: str | None, admitted: bool = True) -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            await stream.aclose()
            self.inflight.difference_update(r.id for r in job.requests)
            if admitted:  # a request that admission refused is counted once, as its error
                tracker.finished(builder.completions(), job.usage(builder.completions())["prompt_tokens"])
                if outcome is not None:
                    self.metrics.error(outcome)

        try:
            if job.stream:
                first = await until_disconnected(request.receive, stream.__anext__())
                state: dict[str, str | None] = {"outcome": "client_disconnected"}
                return StreamResponse(self._sse(job, first, stream, builder, tracker, state),
                                      on_close=lambda timed_out: close("stream_write_timeout" if timed_out
                                                                       else state["outcome"]),
                                      grace=self.settings.shutdown_timeout + 2,
                                      write_timeout=self.settings.stream_write_timeout)
            await until_disconnected(request.receive, self._collect(stream, builder, tracker))
        except ClientGone:
            await close("client_disconnected")
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except BaseException as error:
            failure = backend_failure(error) if isinstance(error, Exception) else None
            refused = isinstance(error, (QueueFullError, ParamError))  # by admission: counted once, as its error
            await close(failure.code if failure else "cancelled", admitted=not refused)
            if failure is None:
                raise
            raise failure from None
        completions = builder.completions()
        failed = next((c for c in completions if c.finish_reason not in ("stop", "length")), None)
        failure = sample_failure(failed, job.backend) if failed else None
        await close(failure.code if failure else None)
        if failure is not None:
            raise failure
        choices = [job.shape.choice(i, c, c.finish_reason) for i, c in enumerate(completions)]
        if job.return_token_ids:
            for choice, c in zip(choices, completions):
                choice["token_ids"] = c.token_ids
        return JSONResponse({**job.envelope(choices, chunk=False), "usage": job.usage(completions)})

    @staticmethod
    async def _collect(stream: AsyncIterator[TokenEvent], builder: CompletionBuilder, tracker: RequestTracker) -> None:
        async for event in stream:
            builder.add(event)
            tracker.event(event)

    async def _sse(self, job: Job, first: TokenEvent, stream: AsyncIterator[TokenEvent],
                   builder: CompletionBuilder, tracker: RequestTracker, state: dict[str, str | None]
                   ) -> AsyncIterator[bytes]:
        started: set[int] = set()
        offsets: dict[int, int] = {}
        event: TokenEvent | None = first
        while event is not None:
            builder.add(event)
            tracker.event(event)
            index = event.prompt_index * job.n + event.index
            failed = event.finish_reason in ("error", "cancelled")  # text folded in with it goes out first
            ids = event.token_ids if job.return_token_ids else []
            if event.text or ids or event.logprobs or not failed and (event.finish_reason or index not in started):
                logprobs = None
                if event.logprobs:
                    logprobs = job.shape.logprobs(event.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(e.token) for e in event.logprobs)
                delta = job.shape.delta(index, event.text, None if failed else event.finish_reason,
                                        event.stop_reason, logprobs, index not in started)
                started.add(index)
                if delta is not None:  # None: a shape holding text back (a tool call in the making)
                    if job.return_token_ids:
                        delta["token_ids"] = ids
                    chunk = job.envelope([delta], chunk=True)
                    if job.include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
            if failed:
                failure = sample_failure(builder.completions()[index], job.backend)
                state["outcome"] = failure.code
                yield sse(failure.body()) + sse("[DONE]")  # as vLLM: a client reading to [DONE] is not left waiting
                return
            try:
                event = await stream.__anext__()
            except StopAsyncIteration:
                event = None
            except Exception as error:  # noqa: BLE001 the backend failed mid-stream: the status line is gone
                failure = backend_failure(error)
                state["outcome"] = failure.code
                yield sse(failure.body())
                yield sse("[DONE]")
                return
        if job.include_usage:
            yield sse({**job.envelope([], chunk=True), "usage": job.usage(builder.completions())})
        yield sse("[DONE]")
        state["outcome"] = None


INLINE_TOKENIZE_CHARS = 16_000  # shorter prompts tokenize too fast to be worth a worker thread
TEMPLATE_CHARS_PER_MESSAGE = 32  # what a chat template adds around a message, roughly, for that measure


async def _validate(make_job: Any, body: SamplingFields, text_size: int) -> Job:
    """Build the job here for short prompts; in a worker thread for long ones, so that
    tokenizing them never stalls the other streams of this server."""
    if text_size <= INLINE_TOKENIZE_CHARS:
        return make_job(body)
    return await anyio.to_thread.run_sync(make_job, body)
