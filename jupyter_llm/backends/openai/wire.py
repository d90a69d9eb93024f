"""What the `openai` backend sends and reads: request bodies for /v1/completions and
/v1/chat/completions, stream chunks, server errors, and the dialects of the servers.

A dialect is the set of fields a family of servers understands beyond OpenAI's own:
  vllm      vLLM, SGLang, TensorRT-LLM's trtllm-serve, this project's server:
            top_k, min_p, repetition_penalty, ignore_eos
  llamacpp  llama-cpp-python's and llama.cpp's servers: top_k, min_p, repeat_penalty
            (their defaults are not "off", so every field is always sent); ignore_eos
            becomes a logit bias against the end-of-sequence ids
  openai    OpenAI's API: only its own fields; the others are refused before sending;
            max_completion_tokens for chat (its reasoning models refuse max_tokens)

Structured output (`SamplingParams.structured`) goes as each family asks for it:
  vllm      JSON as OpenAI's `response_format` (vLLM, SGLang and trtllm-serve take it on both
            endpoints); regex, choice and grammar in vLLM's `structured_outputs` (vLLM >= 0.10.2)
  llamacpp  a GBNF `grammar` (both servers take it on both endpoints); JSON on chat as
            `response_format` {"type": "json_object", "schema": ...}, on completions turned into
            GBNF here by llama-cpp-python's converter; no regex
  openai    JSON as `response_format`, on chat only

vLLM's and OpenAI's servers sample `n` in one request (the prompt is processed and billed
once) and stop at the stop strings sent to them (vLLM says which one matched, in
`stop_reason`). llama-cpp-python ignores `n` and drops a stop string without saying which
one matched: it gets one request per sample, and its stop strings are matched here only
(it serves one request at a time, and closing the request stops it).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from typing import Any

from jupyter_llm.backends.base import Capabilities
from jupyter_llm.backends.openai.resilience import UPSTREAM, retry_after_seconds
from jupyter_llm.errors import BackendError, ParamError, UpstreamBusy
from jupyter_llm.schema import GenerationRequest, SamplingParams
from jupyter_llm.structured import KINDS, StructuredOutput

DIALECTS = ("auto", "vllm", "llamacpp", "openai")
# /v1/models "owned_by" of known servers -> dialect; anything else speaks vLLM's extras.
_OWNERS = {"me": "llamacpp", "llamacpp": "llamacpp", "llama.cpp": "llamacpp",
           "openai": "openai", "system": "openai", "openai-internal": "openai"}
# Servers asked for generated token ids (`return_token_ids`: vLLM 0.10.2+; others ignore it).
TOKEN_ID_OWNERS = ("vllm", "jupyter-llm")
SERVER_SIDE_N = ("vllm", "openai")  # dialects whose servers take n and stop strings
# The StructuredOutput kinds each dialect can ask for (see structured_fields).
STRUCTURED_KINDS = {"vllm": KINDS, "llamacpp": ("json_object", "json_schema", "choice", "grammar"),
                    "openai": ("json_object", "json_schema")}
# Servers of a constraining dialect that do not read its structured-output fields yet: this
# project's own server (its part of issue 17 comes separately).
UNCONSTRAINED_OWNERS = ("jupyter-llm",)
_CONTEXT_ERROR = re.compile(r"context (length|window)|maximum context|max_model_len|too long|exceed", re.IGNORECASE)


def detect_dialect(owned_by: str) -> str:
    return _OWNERS.get(owned_by.lower(), "vllm")


def capabilities_for(dialect: str, owner: str = "") -> Capabilities:
    """What a server of `dialect` honours; `owner` is its /v1/models "owned_by"."""
    common: dict[str, Any] = {"devices": ("remote",), "structured": owner.lower() not in UNCONSTRAINED_OWNERS,
                              "structured_kinds": STRUCTURED_KINDS[dialect],
                              # llama.cpp's servers report logprobs from the logits before the grammar's mask
                              "structured_logprobs": dialect != "llamacpp"}
    if dialect == "openai":
        return Capabilities(top_k=False, min_p=False, batching="continuous", **common)
    # llama-cpp-python's server takes one request at a time.
    return Capabilities(batching="none" if dialect == "llamacpp" else "continuous", **common)


def refusals(params: SamplingParams, dialect: str, eos_known: bool, chat: bool = False) -> list[str]:
    """Fields the capability record cannot express that this dialect cannot send."""
    refused = []
    if dialect == "openai":
        if params.repetition_penalty != 1.0:
            refused.append("repetition_penalty")
        if params.ignore_eos:
            refused.append("ignore_eos")
    if dialect == "llamacpp" and params.ignore_eos and not eos_known:
        refused.append("ignore_eos (the end-of-sequence ids are unknown: pass --tokenizer)")
    if params.structured is not None:
        refused += _structured_refusals(params.structured, dialect, chat)
    return refused


def _structured_refusals(structured: StructuredOutput, dialect: str, chat: bool) -> list[str]:
    if dialect == "openai" and not chat:
        return ["structured output on /v1/completions (OpenAI's response_format is for chat messages only)"]
    if dialect != "llamacpp":
        return []
    refused = []
    if structured.strict:
        refused.append("a strict json_schema (llama.cpp's converter ignores the schema keywords it does not "
                       "implement, such as minimum and maximum)")
    if structured.is_json and not chat and importlib.util.find_spec("llama_cpp") is None:
        refused.append("JSON structured output on /v1/completions without llama-cpp-python installed here (it "
                       "turns the schema into the GBNF grammar the server takes; or send chat messages)")
    if structured.kind == "grammar" and not _is_gbnf(structured.spec):  # type: ignore[arg-type]
        refused.append("a Lark grammar (llama.cpp's servers take GBNF grammars, with 'rule ::= ...' lines)")
    return refused


def structured_fields(structured: StructuredOutput, dialect: str, chat: bool) -> dict[str, Any]:
    """The body fields that ask a server of `dialect` for `structured` (what `refusals` lets
    through; raises ParamError for a schema llama.cpp's converter cannot turn into GBNF)."""
    if structured.kind not in STRUCTURED_KINDS[dialect]:
        raise ParamError(f"the {dialect} dialect cannot send {structured.kind} structured output; it takes "
                         f"{', '.join(STRUCTURED_KINDS[dialect])}")
    if dialect == "llamacpp":
        return _llamacpp_fields(structured, chat)
    if structured.is_json:
        return {"response_format": _response_format(structured)}
    spec = list(structured.spec) if structured.kind == "choice" else structured.spec  # type: ignore[arg-type]
    return {"structured_outputs": {structured.kind: spec}}


def _response_format(structured: StructuredOutput) -> dict[str, Any]:
    """OpenAI's response_format for a JSON constraint."""
    if structured.kind == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": structured.schema,
                                                   "strict": structured.strict}}


def _llamacpp_fields(structured: StructuredOutput, chat: bool) -> dict[str, Any]:
    if structured.is_json and chat:  # the server converts the schema ({"type": "object"} for json_object)
        return {"response_format": {"type": "json_object", "schema": structured.schema}}
    if structured.is_json:
        return {"grammar": _schema_gbnf(json.dumps(structured.schema))}
    if structured.kind == "choice":
        return {"grammar": gbnf_choice(structured.spec)}  # type: ignore[arg-type]
    return {"grammar": structured.spec}


def _is_gbnf(grammar: str) -> bool:
    return "::=" in grammar


@functools.lru_cache(maxsize=64)
def _schema_gbnf(schema: str) -> str:
    """A JSON schema as GBNF, by llama-cpp-python's converter (the one its server uses)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema)
    except Exception as error:  # noqa: BLE001 (the converter asserts, or raises what it meets)
        raise ParamError(f"llama.cpp's converter cannot turn this JSON schema into a grammar: {error}") from None


_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_choice(options: tuple[str, ...]) -> str:
    """A GBNF grammar whose text is exactly one of `options`."""
    return "root ::= " + " | ".join(_gbnf_literal(option) for option in options)


def _gbnf_literal(text: str) -> str:
    def escape(char: str) -> str:
        if char in _GBNF_ESCAPES:
            return _GBNF_ESCAPES[char]
        return f"\\x{ord(char):02x}" if ord(char) < 0x20 or ord(char) == 0x7F else char

    return '"' + "".join(escape(char) for char in text) + '"'


def request_body(request: GenerationRequest, model: str, dialect: str, *, seed: int | None, n: int = 1,
                 max_tokens: int | None = None, eos_ids: frozenset[int] = frozenset(),
                 token_ids: bool = False) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one streamed request for `n` samples of `request` (n > 1 only for
    SERVER_SIDE_N dialects); `max_tokens` overrides the request's (the backend caps it at what
    the context leaves). The backend matches stop strings too, whether they are sent or not.
    """
    p = request.params
    limit = "max_completion_tokens" if dialect == "openai" and request.is_chat else "max_tokens"
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            limit: max_tokens or p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty}
    if n > 1:
        body["n"] = n
    if p.stop and dialect in SERVER_SIDE_N:
        body["stop"] = list(p.stop)
    if seed is not None:
        body["seed"] = seed
    if dialect == "vllm":
        body.update(top_k=p.top_k or -1, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                    ignore_eos=p.ignore_eos)
    elif dialect == "llamacpp":
        body.update(top_k=p.top_k, min_p=p.min_p, repeat_penalty=p.repetition_penalty)
        if p.ignore_eos:
            body["logit_bias"] = {str(i): -100.0 for i in sorted(eos_ids)}
    if token_ids:
        body["return_token_ids"] = True
    if p.structured is not None:
        body.update(structured_fields(p.structured, dialect, request.is_chat))
    if request.is_chat:
        body["messages"] = request.messages
        if p.logprobs is not None:
            body.update(logprobs=True, top_logprobs=p.logprobs)
        return "/chat/completions", body
    body["prompt"] = request.prompt if request.prompt is not None else request.prompt_token_ids
    if p.logprobs is not None:
        body["logprobs"] = p.logprobs
    return "/completions", body


# (token text, logprob, [(alternative text, logprob), best first])
RawLogprob = tuple[str, float, list[tuple[str, float]]]


@dataclass
class Delta:
    """What one stream chunk says about one choice."""

    text: str = ""
    token_ids: list[int] | None = None  # only when the server reports them
    logprobs: list[RawLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended it, when the server says (vLLM)


def parse_chunk(payload: dict[str, Any], chat: bool, top: int) -> tuple[list[tuple[int, Delta]], int | None]:
    """([(choice index, its delta)], prompt tokens from usage or None)."""
    usage = payload.get("usage") or {}
    return [(int(choice.get("index") or 0), _delta(choice, chat, top)) for choice in payload.get("choices") or []], \
        usage.get("prompt_tokens")


def _delta(choice: dict[str, Any], chat: bool, top: int) -> Delta:
    if chat:
        text = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    raw = choice.get("logprobs")
    logprobs = (_chat_logprobs(raw, top) if chat else _completion_logprobs(raw, top)) if raw else None
    ids = choice.get("token_ids")
    stop = choice.get("stop_reason")  # vLLM: the stop string, or the id of a stop token
    return Delta(text, list(ids) if ids is not None else None, logprobs, choice.get("finish_reason"),
                 stop if isinstance(stop, str) else None)


def _best(alternatives: list[tuple[str, float]], top: int) -> list[tuple[str, float]]:
    return sorted(alternatives, key=lambda a: a[1], reverse=True)[:top]


def _completion_logprobs(raw: dict[str, Any], top: int) -> list[RawLogprob]:
    tokens, values = raw.get("tokens") or [], raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or [None] * len(tokens)
    return [(token, value, _best(list((alts or {}).items()), top)) for token, value, alts in zip(tokens, values, tops)]


def _chat_logprobs(raw: dict[str, Any], top: int) -> list[RawLogprob]:
    return [(entry["token"], entry["logprob"],
             _best([(a["token"], a["logprob"]) for a in entry.get("top_logprobs") or []], top))
            for entry in raw.get("content") or []]


def sse_payload(line: str) -> dict[str, Any] | str | None:
    """The JSON object of one `data:` line, "[DONE]", or None for other lines (comments, pings,
    events). Raises ValueError for data that is not a JSON object."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    if not data:
        return None
    payload = json.loads(data)
    if not isinstance(payload, dict):
        raise ValueError(f"a stream chunk is not a JSON object: {data[:200]}")  # noqa: TRY004 (callers catch bad JSON as ValueError)
    return payload


def error_message(body: bytes | str) -> str:
    """The message of an error body in the shapes servers use (OpenAI's, vLLM's, FastAPI's)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "no details"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in data:
            return json.dumps(data["detail"]) if not isinstance(data["detail"], str) else data["detail"]
    return text.strip()[:500]


def refusal_error(status: int, message: str, target: str = UPSTREAM, max_model_len: int | None = None,
                  retry_after: str | None = None) -> Exception:
    """The error to raise for a non-2xx answer: ParamError for a refused request, UpstreamBusy (with
    the answer's Retry-After header, parsed) for overload, else BackendError. Only a refused
    request's error repeats the server's `message` (it says what to mend); the caller logs it."""
    if status in (401, 403):
        return BackendError(f"{target} refused the API key (HTTP {status}); give --api-key or --api-key-env")
    if status == 404:
        return BackendError(f"{target}: not found (HTTP 404); check --url and --model")
    if status in (429, 503):
        return UpstreamBusy(f"{target} is busy (HTTP {status}) and retries did not help",
                            retry_after_seconds(retry_after))
    if 400 <= status < 500:
        if _CONTEXT_ERROR.search(message):
            known = f" (max_model_len {max_model_len})" if max_model_len else \
                " (set --max-model-len to check prompts before sending them)"
            return ParamError(f"the prompt does not fit the server's context{known}: {message}")
        return ParamError(f"{target} refused the request (HTTP {status}): {message}")
    return BackendError(f"{target} failed (HTTP {status})")
