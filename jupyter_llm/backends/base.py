"""The backend protocol: what every engine behind the manager provides.

A backend is an async stream: `generate(request)` yields `TokenEvent`s and closing the
iterator cancels the request. Heavy work happens in `load()` (called in the caller's
thread so that progress bars show in the cell) and in the backend's own threads.
"""
from __future__ import annotations

import contextlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.errors import ParamError
from jupyter_llm.schema import GenerationRequest, Message, PreparedRequest, TokenEvent
from jupyter_llm.structured import KINDS


def missing_packages(*modules: str) -> list[str]:
    """The modules among `modules` that are not installed (looked up without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def package_availability(install_hint: str, *modules: str) -> tuple[bool, str]:
    """`Backend.availability` for what `modules` provide: (True, "") when all are installed,
    else (False, "missing a, b: <install_hint>")."""
    missing = missing_packages(*modules)
    return (not missing, f"missing {', '.join(missing)}: {install_hint}" if missing else "")


def check_prompt_fits(prompt_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt that leaves no room for one generated token in the context."""
    if prompt_tokens >= max_model_len:
        raise ParamError(f"the prompt has {prompt_tokens} tokens; this model accepts at most "
                         f"{max_model_len - 1} prompt tokens (max_model_len {max_model_len})")


@dataclass(frozen=True)
class Capabilities:
    """What a backend honours. A parameter outside these is refused, never silently dropped."""

    streaming: bool = True
    logprobs: bool = True
    batching: str = "continuous"  # "continuous" | "static" (next batch) | "none" (one at a time)
    prefix_cache: bool = False
    speculative: bool = False
    seeds: bool = True
    penalties: bool = True
    top_k: bool = True
    min_p: bool = True
    chat: bool = True
    structured: bool = False  # constrained output (SamplingParams.structured)
    structured_kinds: tuple[str, ...] = KINDS  # the StructuredOutput kinds it constrains, when structured
    structured_logprobs: bool = True  # a constrained sample's logprobs are those under the mask
    devices: tuple[str, ...] = ("cpu",)

    def refusal(self, request: GenerationRequest, backend: str) -> str | None:
        """Why this request asks for something the backend cannot do, or None."""
        p = request.params
        kind = p.structured.kind if p.structured is not None else None
        checks = [
            (p.logprobs is not None and not self.logprobs, "logprobs"),
            (p.seed is not None and not self.seeds, "seed"),
            (p.uses_penalties and not self.penalties, "repetition/presence/frequency penalties"),
            (p.top_k > 0 and not self.top_k, "top_k"),
            (p.min_p > 0 and not self.min_p, "min_p"),
            (request.is_chat and not self.chat, "chat messages"),
            (kind is not None and not self.structured, "structured output"),
            (kind is not None and self.structured and kind not in self.structured_kinds,
             f"{kind} structured output (it takes {', '.join(self.structured_kinds)})"),
            (kind is not None and p.logprobs is not None and not self.structured_logprobs,
             "logprobs with structured output"),
        ]
        missing = [name for failed, name in checks if failed]
        return f"backend {backend!r} does not support {', '.join(missing)}" if missing else None


class Backend(ABC):
    """One loaded model behind one engine."""

    kind: ClassVar[str]  # registry name: "hf", "native", ...
    # Entry-point backends describe themselves here and in availability(); built-in kinds do
    # it in their BackendSpec (backends/__init__.py), which is read without importing them.
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""  # the exact pip command when the package is missing
    options_class: ClassVar[type[BackendOptions]] = BackendOptions
    capabilities: Capabilities = Capabilities()
    # A sample's error text is an exception's own words (for the notebook and the log), unless
    # the backend writes it for a server's clients: what failed, without internals
    errors_fit_for_clients: ClassVar[bool] = False

    def __init__(self, model: str | None = None, **options: Any):
        self.options = self.options_class.parse(options, self.kind)
        self.model_arg = model
        self.model_name = model or ""
        self.device = "cpu"
        self.dtype = ""

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(can load on this machine, why not); asked of entry-point backends only."""
        return True, ""

    # --- life cycle -------------------------------------------------------------------
    def load(self, progress: bool = True) -> None:
        """Load weights (blocking, in the caller's thread). Default: nothing to load."""

    async def start(self) -> None:
        """Start background work (threads, connections) once loaded."""

    async def stop(self) -> None:
        """Cancel what runs and free resources."""

    def join(self, timeout: float) -> bool:
        """Stop and block the calling thread until this backend's own threads have ended, without
        the manager's loop; True when none is left. At exit a daemon thread still inside native
        code when the interpreter finalizes aborts the process. Default: no threads."""
        return True

    # --- generation ---------------------------------------------------------------------
    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream events for every sample of `request`; closing the iterator cancels it."""

    def hold_admission(self) -> contextlib.AbstractContextManager:
        """Requests started inside this block are admitted together (a batch stays a batch)."""
        return contextlib.nullcontext()

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse what this backend cannot honour, with a clear message."""
        reason = self.capabilities.refusal(request, self.kind)
        if reason:
            raise ParamError(reason)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check a request once (raises ParamError); the manager and `generate` then run the
        prepared request as it is. Default: `check_request`; a backend that tokenizes here
        adds the prompt ids."""
        if isinstance(request, PreparedRequest) and request.backend is self:
            return request
        self.check_request(request)
        return PreparedRequest.of(request, self)

    def prompt_ids(self, request: GenerationRequest) -> list[int] | None:
        """The token ids of a request's prompt or conversation (the ones it carries, if any); None
        from a backend that forwards the text to a server that tokenizes and counts it itself."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            return self.tokenize(self.apply_chat_template(request.messages))
        return self.tokenize(request.prompt or "")

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Live numbers for status tables: running, waiting, and backend-specific ones."""

    def health(self) -> str | None:
        """None while the backend can serve requests, else why it cannot (the server's /health
        answers 503 with it)."""
        return None

    # --- tokenizer services ---------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def apply_chat_template(self, messages: list[Message]) -> str: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]: ...

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model_name, "device": self.device, "dtype": self.dtype}
