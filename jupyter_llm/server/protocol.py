"""The OpenAI API's shapes: the request schemas (strict pydantic models, so that "0.5" is
not a number), the error object, and the builders of responses and stream chunks."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from jupyter_llm.errors import BackendError, NoBackendError, ParamError, QueueFullError, UpstreamBusy, UserError
from jupyter_llm.schema import Completion, TokenLogprob

MAX_PROMPTS = 64  # prompts in one /v1/completions request
INT64 = 2**63


class APIError(Exception):
    """An error answered with the OpenAI error object. `code` also names the error in /metrics."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code or ("invalid_request" if status < 500 else "internal_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# strict: "0.5" is not a number; forbid: a field this server does not know is a 400 naming it,
# not silently dropped
_STRICT = ConfigDict(strict=True, extra="forbid")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class SamplingFields(BaseModel):
    """Fields both generation endpoints take; None (or absent) means the default."""

    model_config = _STRICT
    model: str | None = None
    n: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)  # a prefix-cache namespace
    return_token_ids: bool | None = None  # each choice (and chunk) carries its generated token ids
    # output constraints (structured_fields.py): OpenAI's, then vLLM's and its older names
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted and refused unless empty, so that nothing is silently ignored
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str


class ToolCallField(BaseModel):
    """One call in an assistant message of the history."""

    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # null (or absent) only beside tool_calls: tool_calls.py
    name: str | None = None
    tool_calls: list[ToolCallField] | None = None
    tool_call_id: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# Every field name of the request schemas: what is not one of them (nor an index) in a
# validation error's location is a union branch's tag, like 'list[str]'.
FIELD_NAMES = frozenset(name for model in (CompletionRequest, ChatRequest, ChatMessage, ContentPart, StreamOptions,
                                           ToolCallField, FunctionCall)
                        for name in model.model_fields)


def bounded_models(max_n: int, max_tokens: int, max_messages: int) -> tuple[type[CompletionRequest],
                                                                           type[ChatRequest]]:
    """The request models with this server's bounds on n, max_tokens and the number of messages,
    so that the OpenAPI document states the limits that validation enforces."""
    n = (Annotated[int, Field(ge=1, le=max_n)] | None, None)
    tokens = (Annotated[int, Field(ge=1, le=max_tokens)] | None, None)
    messages = (Annotated[list[ChatMessage], Field(min_length=1, max_length=max_messages)], ...)
    completion = create_model("CompletionRequest", __base__=CompletionRequest, n=n, max_tokens=tokens)
    chat = create_model("ChatCompletionRequest", __base__=ChatRequest, n=n, max_tokens=tokens,
                        max_completion_tokens=tokens, messages=messages)
    return completion, chat


def user_error(error: UserError) -> APIError:
    """A user's error as the OpenAI error object: the server's one mapping of jupyter_llm.errors.
    A ParamError names its parameter when the message starts with a request field."""
    message = str(error)
    if isinstance(error, ParamError):
        first = message.split(" ", 1)[0]
        known = set(SamplingFields.model_fields) | {"max_tokens", "logprobs", "top_logprobs", "prompt", "messages"}
        return APIError(400, message, param=first if first in known else None, code="invalid_value")
    if isinstance(error, QueueFullError):
        return APIError(503, message, type="server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, UpstreamBusy):  # overload upstream is overload here: the client may retry
        wait = max(1, math.ceil(error.retry_after or 1))
        return APIError(503, message, type="server_error", code="upstream_busy", headers={"Retry-After": str(wait)})
    if isinstance(error, NoBackendError):
        return APIError(404, message, param="model", code="model_not_found")
    if isinstance(error, BackendError):
        return APIError(500, message, type="server_error", code="backend_error")
    return APIError(400, message)  # the rest (ModelNotFound, ServerError...) is the request's to mend


# --- responses ------------------------------------------------------------------------------

def finite(value: float) -> float:
    """JSON has no -inf: a token the model gives no chance gets -9999, as OpenAI reports it."""
    return value if math.isfinite(value) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionShape:
    """/v1/completions: choices carry `text`; logprobs are the legacy parallel lists."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    @staticmethod
    def logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return {"tokens": [e.token for e in entries],
                "token_logprobs": [finite(e.logprob) for e in entries],
                "top_logprobs": [{t: finite(v) for _, t, v in e.top} for e in entries],
                "text_offset": offsets}

    def choice(self, index: int, c: Completion, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "text": c.text, "finish_reason": finish_reason, "stop_reason": c.stop_reason,
                "logprobs": self.logprobs(c.logprobs, 0) if c.logprobs is not None else None}

    def delta(self, index: int, text: str, finish_reason: str | None, stop_reason: str | None,
              logprobs: dict | None, first: bool) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": finish_reason, "stop_reason": stop_reason,
                "logprobs": logprobs}


class ChatShape:
    """/v1/chat/completions: choices carry a `message` (a `delta` when streaming)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    @staticmethod
    def logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode("utf-8", "replace"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for _, t, v in e.top]}
                            for e in entries]}

    def choice(self, index: int, c: Completion, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": finish_reason, "stop_reason": c.stop_reason,
                "logprobs": self.logprobs(c.logprobs) if c.logprobs is not None else None}

    def delta(self, index: int, text: str, finish_reason: str | None, stop_reason: str | None,
              logprobs: dict | None, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "stop_reason": stop_reason,
                "logprobs": logprobs}


def message_text(content: str | list[Any], index: int) -> str:
    """A message's content: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content parts are supported (message {index} has a {part.type!r} part)",
                           param=f"messages.{index}.content", code="unsupported")
        parts.append(part.text)
    return "\n".join(parts)
