"""The `openai` backend: any OpenAI-compatible server (vllm serve, trtllm-serve, SGLang,
llama.cpp's and llama-cpp-python's servers, this project's own `%llm_serve`).

A request is one streamed HTTP request for all its samples where the server takes `n`, else
one per sample (sample i with seed + i), read over SSE with httpx; closing the event stream
closes the HTTP request, which tells the server to stop. Stop strings are sent where the
server takes them (see wire.py) and matched here too with the shared StopMatcher. Opening a request is retried on
connection failures and 429/503 (honouring Retry-After), and a circuit breaker fails
fast for a cool-down after repeated failures (connections, timeouts, 5xx answers).

Errors while generating name "the upstream server", never its URL, and carry no exception
text (they may reach the clients of this project's server); the details go to the log.

Token ids: the OpenAI protocol carries text, not ids. vLLM returns ids when asked
(`return_token_ids`) and chunks that carry `token_ids` are used as they are; otherwise a
local tokenizer that matches the server's model (--tokenizer, or the served model when it
is a local file or folder) turns each streamed piece back into ids. Without either,
events carry text only.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from jupyter_llm.backends.base import Backend, Capabilities, check_prompt_fits
from jupyter_llm.backends.meter import TokenMeter
from jupyter_llm.backends.openai.readers import StreamReader
from jupyter_llm.backends.openai.resilience import (
    CONNECTION_ERRORS,
    UPSTREAM,
    CircuitBreaker,
    RetryPolicy,
    error_text,
    send_with_retries,
)
from jupyter_llm.backends.openai.wire import (
    DIALECTS,
    SERVER_SIDE_N,
    TOKEN_ID_OWNERS,
    capabilities_for,
    detect_dialect,
    error_message,
    refusal_error,
    refusals,
    request_body,
    structured_fields,
)
from jupyter_llm.backends.options import BackendOptions
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.model_files import resolve_model
from jupyter_llm.schema import GenerationRequest, Message, TokenEvent
from jupyter_llm.tokenizers import Tokenizer, load_gguf_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
DEFAULT_MAX_MODEL_LEN = 131072  # when neither the server nor --max-model-len says


@dataclass
class OpenAIOptions(BackendOptions):
    url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    api_key_env: str | None = None  # name of an environment variable holding the key
    dialect: str = "auto"  # auto | vllm | llamacpp | openai (see openai_wire)
    tokenizer: str | None = None  # a local model whose tokenizer is the server's (alias, folder, .gguf)
    max_model_len: int | None = None  # default: what /v1/models says, else 131072
    connect_timeout: float = 10.0
    read_timeout: float = 300.0  # most seconds between two chunks of a stream
    max_retries: int = 3
    breaker_threshold: int = 5  # consecutive failures (connections, timeouts, 5xx) that open the circuit
    breaker_cooldown: float = 30.0  # seconds it stays open


def normalize_url(url: str) -> str:
    """'http://host:port' means 'http://host:port/v1'; a URL with a path is used as given."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ParamError(f"--url must be an http(s) URL like http://127.0.0.1:8000/v1, got {url!r}")
    return url if parts.path else url + "/v1"


def local_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a model the registry resolves (GGUF: its vocabulary only; HF: tokenizer files)."""
    spec = resolve_model(name)
    if spec.is_gguf:  # needs llama_cpp, imported by load_gguf_tokenizer
        return load_gguf_tokenizer(spec.path)
    return load_tokenizer(spec.path)


class OpenAIBackend(Backend):
    kind = "openai"
    options_class = OpenAIOptions
    capabilities = Capabilities(devices=("remote",))
    errors_fit_for_clients = True  # readers.py and resilience.py log the upstream's details

    def __init__(self, model: str | None = None, **options: Any):
        super().__init__(model, **options)
        opts: OpenAIOptions = self.options  # type: ignore[assignment]
        if opts.dialect not in DIALECTS:
            raise ParamError(f"--dialect must be one of {', '.join(DIALECTS)}, got {opts.dialect!r}")
        self.url = normalize_url(opts.url)
        self.root = self.url.removesuffix("/v1")
        self.dialect = opts.dialect
        self.tokenizer: Tokenizer | None = None
        self.policy = RetryPolicy(max_retries=opts.max_retries)
        self.breaker = CircuitBreaker(opts.breaker_threshold, opts.breaker_cooldown)
        self.meter = TokenMeter()
        self.retries = 0
        self.errors = 0
        self.client: httpx.AsyncClient | None = None
        self._token_ids_from_server = False
        self._max_model_len = DEFAULT_MAX_MODEL_LEN
        self._max_model_len_known = False
        self.device = urlsplit(self.url).netloc

    # --- life cycle -------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        opts: OpenAIOptions = self.options  # type: ignore[assignment]
        key = opts.api_key
        if opts.api_key_env:
            key = os.environ.get(opts.api_key_env)
            if not key:
                raise BackendError(f"--api-key-env {opts.api_key_env}: that environment variable is not set")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _timeout(self) -> httpx.Timeout:
        opts: OpenAIOptions = self.options  # type: ignore[assignment]
        return httpx.Timeout(opts.read_timeout, connect=opts.connect_timeout)

    def load(self, progress: bool = True) -> None:
        """Ask the server for its models: pick one, learn its dialect and context length."""
        opts: OpenAIOptions = self.options  # type: ignore[assignment]
        try:
            response = httpx.get(self.url + "/models", headers=self._headers(), timeout=self._timeout())
        except httpx.HTTPError as error:
            raise BackendError(f"cannot reach {self.url} ({type(error).__name__}: {error}); is the server "
                               f"running? (--url)") from None
        if response.status_code != 200:
            message = error_message(response.content)
            log.warning("%s/models answered HTTP %d: %s", self.url, response.status_code, message)
            raise refusal_error(response.status_code, message, self.url)
        cards = [c for c in response.json().get("data", []) if isinstance(c, dict) and c.get("id")]
        if not cards:
            raise BackendError(f"{self.url}/models lists no model")
        ids = [c["id"] for c in cards]
        if self.model_arg and self.model_arg not in ids:
            raise BackendError(f"{self.url} does not serve {self.model_arg!r}; it serves: {', '.join(ids)}")
        card = cards[ids.index(self.model_arg)] if self.model_arg else cards[0]
        self.model_name = card["id"]
        owner = str(card.get("owned_by", ""))
        if self.dialect == "auto":
            self.dialect = detect_dialect(owner)
        self.capabilities = capabilities_for(self.dialect, owner)
        self._token_ids_from_server = self.dialect == "vllm" and owner in TOKEN_ID_OWNERS
        told = opts.max_model_len or card.get("max_model_len")
        self._max_model_len_known = bool(told)
        self._max_model_len = int(told or DEFAULT_MAX_MODEL_LEN)
        self.tokenizer = self._find_tokenizer(opts.tokenizer, card)
        self.dtype = self.dialect

    def _find_tokenizer(self, explicit: str | None, card: dict[str, Any]) -> Tokenizer | None:
        if explicit:
            return local_tokenizer(explicit)
        # The served model may be a file or folder here (llama-cpp-python serves a path; this
        # project's server names its model in "root"): then its tokenizer is at hand.
        for name in (card.get("root"), card["id"]):
            try:
                if name and resolve_model(name).kind in ("gguf", "hf"):
                    return local_tokenizer(name)
            except (ValueError, ImportError, OSError):
                continue
        return None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.url, headers=self._headers(), timeout=self._timeout(),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # --- generation -------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        refused = refusals(request.params, self.dialect, bool(self.eos_token_ids), request.is_chat)
        if refused:
            raise ParamError(f"backend 'openai' ({self.dialect} dialect) does not support "
                             f"{', '.join(refused)}")
        if request.params.structured is not None:  # a schema the dialect cannot convert fails here, not mid-send
            structured_fields(request.params.structured, self.dialect, request.is_chat)

    def prompt_ids(self, request: GenerationRequest) -> list[int] | None:
        """The local tokenizer's ids (those _local_prompt_tokens counts); without one, None: the
        server counts the prompt and applies its own chat template (asking it to tokenize first
        would cost a round trip per request, and no server tokenizes chat for llama-cpp-python)."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if self.tokenizer is None or (request.is_chat and not self.tokenizer.has_chat_template):
            return None
        return self.tokenizer.prompt_ids(request)

    def _local_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The prompt's length by the local tokenizer (None without one); refuses what cannot fit."""
        if self.tokenizer is None or (request.is_chat and not self.tokenizer.has_chat_template):
            return len(request.prompt_token_ids) if request.prompt_token_ids is not None else None
        count = len(self.tokenizer.prompt_ids(request))
        check_prompt_fits(count, self.max_model_len)
        return count

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        request = self.prepare(request)  # a prepared request is not checked again
        if self.client is None:
            raise BackendError("the openai backend is not started")
        prompt_tokens = self._local_prompt_tokens(request)
        n = request.params.n
        # One request for every sample where the server takes n (the prompt is processed and
        # billed once), else one request per sample.
        groups = [range(n)] if self.dialect in SERVER_SIDE_N else [range(i, i + 1) for i in range(n)]
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._stream(request, samples, prompt_tokens, queue)) for samples in groups]
        remaining = n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()  # closes their HTTP streams
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _open(self, request: GenerationRequest, samples: range, prompt_tokens: int | None) -> httpx.Response:
        p = request.params
        max_tokens = p.max_tokens
        if prompt_tokens is not None and self._max_model_len_known:
            # As in-process backends do, a sample ends ("length") where the context ends, rather
            # than the server refusing max_tokens past it.
            max_tokens = max(1, min(max_tokens, self.max_model_len - prompt_tokens))
        # Sample i of a seeded request uses seed + i, as vLLM seeds the samples of one request.
        path, body = request_body(request, self.model_name, self.dialect, n=len(samples),
                                  seed=None if p.seed is None else p.seed + samples.start, max_tokens=max_tokens,
                                  eos_ids=self.eos_token_ids, token_ids=self._token_ids_from_server)
        assert self.client is not None
        client = self.client

        def count_retry(_: str) -> None:
            self.retries += 1

        response = await send_with_retries(lambda: client.send(client.build_request("POST", path, json=body),
                                                               stream=True),
                                           self.policy, self.breaker, self.url, count_retry)
        if response.status_code != 200:
            message = error_message(await response.aread())
            await response.aclose()
            log.warning("%s%s answered HTTP %d: %s", self.url, path, response.status_code, message)
            raise refusal_error(response.status_code, message, UPSTREAM,
                                self.max_model_len if self._max_model_len_known else None,
                                response.headers.get("retry-after"))
        return response

    async def _stream(self, request: GenerationRequest, samples: range, prompt_tokens: int | None,
                      queue: asyncio.Queue) -> None:
        """Stream the samples of one HTTP request into `queue`: their events, or an exception if
        it could not start."""
        for _ in samples:
            self.meter.started()
        try:
            try:
                response = await self._open(request, samples, prompt_tokens)
            except Exception as error:  # noqa: BLE001 (the reader raises it in the request's stream)
                self.errors += 1
                queue.put_nowait(error)
                return
            reader = StreamReader(self, request, samples, prompt_tokens)
            try:
                async for line in response.aiter_lines():
                    for event in reader.feed(line):
                        queue.put_nowait(event)
                    if reader.done:
                        return  # stop strings matched, or the server finished: closing ends the request
                for event in reader.finish(None):
                    queue.put_nowait(event)
            except (httpx.TimeoutException, *CONNECTION_ERRORS) as error:
                self.errors += 1
                detail = f"{self.url}: {error_text(error)}"
                log.warning("the stream from %s failed: %s", self.url, error_text(error))
                self.breaker.record_failure(detail)
                failed = "sent nothing within the read timeout" if isinstance(error, httpx.TimeoutException) \
                    else "broke the connection"
                for event in reader.finish("error", f"{UPSTREAM} {failed} mid-stream"):
                    queue.put_nowait(event)
            except ValueError as error:  # a chunk that is not the OpenAI shape
                self.errors += 1
                log.warning("%s sent an unreadable chunk: %s", self.url, error)
                for event in reader.finish("error", f"{UPSTREAM} sent a chunk that is not OpenAI's shape"):
                    queue.put_nowait(event)
            finally:
                await response.aclose()
        finally:
            for _ in samples:
                self.meter.finished()

    def stats(self) -> dict[str, Any]:
        return {"running": self.meter.running, "waiting": 0, "tokens_per_s": self.meter.tokens_per_s(),
                "tokens_generated": self.meter.tokens_generated, "url": self.url, "dialect": self.dialect,
                "circuit": self.breaker.describe(), "retries": self.retries, "errors": self.errors}

    # --- tokenizer services -------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        # vLLM's /tokenize, then llama-cpp-python's /extras/tokenize.
        for path, body in (("/tokenize", {"model": self.model_name, "prompt": text}),
                           ("/extras/tokenize", {"input": text})):
            try:
                response = httpx.post(self.root + path, json=body, headers=self._headers(), timeout=self._timeout())
            except httpx.HTTPError:
                break
            if response.status_code == 200 and "tokens" in response.json():
                return list(response.json()["tokens"])
        raise BackendError(f"cannot tokenize: {self.root} offers no tokenize endpoint; pass --tokenizer MODEL "
                           f"(the served model's tokenizer) to tokenize here")

    def apply_chat_template(self, messages: list[Message]) -> str:
        if self.tokenizer is None:
            raise BackendError("the server applies its own chat template to chat messages; to render it here, "
                               "pass --tokenizer MODEL")
        return self.tokenizer.apply_chat_template(messages)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset()

    def token_id(self, text: str) -> int:
        """The id of a token given as text, by the local tokenizer; -1 when unknown."""
        if self.tokenizer is None or not text:
            return -1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else -1
