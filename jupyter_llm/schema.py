"""Plain data shared by every entry point and backend: no torch here.

A request goes in as a `GenerationRequest` (a `PreparedRequest` once a backend checked it); a
backend answers with a stream of `TokenEvent`s, and the manager folds those into one
`Completion` per sample.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.structured import StructuredOutput


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamError(message)


# The longest stop string accepted: the text held back while a stop string may be starting,
# and so the work per generated token, grows with it.
MAX_STOP_CHARS = 1024
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): logits / 1e-37 are inf, and the
# softmax of inf is NaN.
MIN_TEMPERATURE = 1e-5

@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Names and meanings follow OpenAI and vLLM.

    top_k = 0 (or -1) and top_p = 1 and min_p = 0 disable those filters;
    temperature = 0 is greedy decoding. `structured` constrains the answer (structured.py): a
    `StructuredOutput`, or its dict form ({"json_schema": {...}}, {"choice": [...]}, ...).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured, dict):
            object.__setattr__(self, "structured", StructuredOutput.from_dict(self.structured))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                   f"{name} must be a finite number, got {value!r}")
            return value

        def integer(name: str) -> int:
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool),
                   f"{name} must be an integer, got {value!r}")
            return value

        _check(integer("max_tokens") >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(number("temperature") >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0 < number("top_p") <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(integer("top_k") >= 0, f"top_k must be >= 0 (0 or -1 = disabled), got {self.top_k}")
        _check(0 <= number("min_p") <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(number("repetition_penalty") > 0,
               f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _check(-2 <= number("presence_penalty") <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= number("frequency_penalty") <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                   f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(len(self.stop) <= 16, f"stop takes at most 16 stop strings, got {len(self.stop)}")
        longest = max((len(s) for s in self.stop), default=0)
        _check(longest <= MAX_STOP_CHARS,
               f"stop strings may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        _check(1 <= integer("n") <= 128, f"n must be in [1, 128], got {self.n}")
        if self.logprobs is not None:
            _check(isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                   and 0 <= self.logprobs <= 20,
                   f"logprobs must be an integer in [0, 20] (top alternatives) or None, got {self.logprobs!r}")
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _check(self.structured is None or isinstance(self.structured, StructuredOutput),
               f"structured must be a StructuredOutput or its dict form, got {type(self.structured).__name__}")

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE decode greedily: dividing logits by them overflows."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        data["structured"] = None if self.structured is None else self.structured.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown sampling parameter(s) {unknown}; accepted: {sorted(known)}")
        return cls(**data)


Message = dict[str, str]


@dataclass
class GenerationRequest:
    """One prompt (text) or one conversation (chat messages), with how to sample it."""

    prompt: str | None = None
    messages: list[Message] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # Token ids of the prompt, when the caller already has them (then `prompt` may be None).
    prompt_token_ids: list[int] | None = None
    # The prefix-cache namespace (vLLM's cache_salt): requests of different salts share no cached
    # blocks, so time to first token reveals nothing of another salt's prompts.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids))
        _check(given >= 1, "a request needs a prompt, chat messages or prompt token ids")
        _check(self.prompt is None or self.messages is None, "give either a prompt or chat messages, not both")
        if self.messages is not None:
            _check(isinstance(self.messages, list) and len(self.messages) > 0,
                   "chat messages must be a non-empty list of {'role': ..., 'content': ...}")
            for message in self.messages:
                _check(isinstance(message, dict) and isinstance(message.get("role"), str)
                       and isinstance(message.get("content"), str),
                       f"each chat message must be {{'role': str, 'content': str}}, got {message!r}")
        if self.prompt is not None:
            _check(isinstance(self.prompt, str), f"prompt must be a string, got {type(self.prompt).__name__}")
        _check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""),
               "cache_salt must be a non-empty string")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class PreparedRequest(GenerationRequest):
    """A request that one backend has checked (`Backend.prepare`), carrying its prompt's token ids
    where that backend tokenizes here. The manager and the backend's `generate` run it as it is:
    a request is validated and tokenized once, where it enters, whoever passes it on."""

    backend: Any = field(default=None, repr=False, compare=False)  # the Backend that checked it

    @classmethod
    def of(cls, request: GenerationRequest, backend: Any, prompt_token_ids: list[int] | None = None
           ) -> PreparedRequest:
        """`request` (same id) as checked by `backend`, with its prompt ids (default: the ones it carries)."""
        ids = request.prompt_token_ids if prompt_token_ids is None else prompt_token_ids
        return cls(prompt=request.prompt, messages=request.messages, params=request.params, id=request.id,
                   prompt_token_ids=ids, cache_salt=request.cache_salt, backend=backend)


@dataclass
class TokenLogprob:
    """The log-probability of one generated token, with the top alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class TokenEvent:
    """New output of one sample of one request. The last event of a sample has `finish_reason` set."""

    request_id: str
    index: int  # sample index, 0 <= index < n
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None  # set with finish_reason == "error"
    prompt_tokens: int | None = None  # set on the last event
    stop_reason: str | None = None  # the stop string that matched, if any
    prompt_index: int = 0  # set by the manager when several prompts run together
    timestamp: float = field(default_factory=time.monotonic)  # when the backend produced it


@dataclass
class Timings:
    """Seconds, measured where tokens arrive. ttft is from submission to the first token."""

    ttft: float | None = None
    total: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since submission, one per token

    @property
    def decode_tokens_per_s(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        span = self.token_times[-1] - self.token_times[0]
        return (len(self.token_times) - 1) / span if span > 0 else None


@dataclass
class Completion:
    """The whole answer of one sample of one prompt."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    prompt_index: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    timings: Timings = field(default_factory=Timings)
    request_id: str = ""
    backend: str = ""
    model: str = ""
    error: str | None = None
    stop_reason: str | None = None
    parsed: Any = None  # the JSON value of a JSON-constrained answer that ended with "stop"
    # Tokens generated: the number of token_ids unless given. A consumer that keeps only counts (a
    # streamed HTTP answer, whose client has the output) counts here and keeps no ids, text or logprobs.
    completion_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.completion_tokens is None:
            self.completion_tokens = len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def __str__(self) -> str:
        return self.text
