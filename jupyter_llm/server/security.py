"""The guards in front of the routes: API keys (compared in constant time), per-key rate
limits (token buckets), and a bound on request bodies. Plain ASGI middleware, so that they
run before the body is read or parsed."""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jupyter_llm.server.protocol import APIError

ErrorSender = Callable[[APIError, Scope, Receive, Send], Any]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyChecker:
    """Checks a presented key against every configured key, always comparing with all of
    them, and as SHA-256 digests of one length, so that the time taken says nothing about
    which key matched, how much of it, or how long the keys are."""

    def __init__(self, keys: tuple[str, ...]):
        self._digests = [_digest(k.encode("utf-8")) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def valid(self, presented: str) -> bool:
        candidate = _digest(presented.encode("utf-8", "surrogateescape"))
        matched = False
        for key in self._digests:
            matched |= hmac.compare_digest(candidate, key)
        return matched


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; a request takes one."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per client key; the least recently seen buckets are dropped past
    `max_clients`, so that memory stays bounded whatever the keys."""

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = 10_000):
        self.rate, self.burst = rate, burst if burst is not None else max(1.0, rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """0 when the request may go on, else the seconds to wait."""
        with self._lock:
            bucket = self._buckets.pop(client, None) or TokenBucket(self.rate, self.burst)
            self._buckets[client] = bucket
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return bucket.take(time.monotonic())


def header(scope: Scope, name: bytes) -> str:
    """A request header's value ("" when absent)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def host_name(host: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" -> "::1", "a.b:80" -> "a.b"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            # The header's own bytes: UTF-8, with anything else kept byte for byte (a non-ASCII key
            # must come back as the bytes it was sent as).
            scheme, _, token = value.decode("utf-8", "surrogateescape").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def cache_salt(scope: Scope, keys: KeyChecker, asked: str | None) -> str | None:
    """The prefix-cache salt of a request: with keys, the key's own namespace (a digest, never the
    key), so that time to first token tells nobody another key's prompts; then the client's own
    `cache_salt` within it."""
    token = bearer_token(scope) if keys.enabled else None
    own = "key:" + _digest(token.encode("utf-8", "surrogateescape")).hex()[:32] if token else None
    return "/".join(s for s in (own, asked) if s) or None


def route_path(scope: Scope) -> str:
    """The path as this app routes it: under a mount (`Mount("/llm", app)`) the scope's path
    keeps the prefix, which `root_path` names."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class GuardMiddleware:
    """On every route: a Host header from `allowed_hosts` (403; None allows any). On /v1 routes:
    the rate limit (429), then a valid key when keys are set (401). On every route: bodies larger
    than `max_body_bytes` get 413."""

    def __init__(self, app: ASGIApp, keys: KeyChecker, limiter: RateLimiter | None, max_body_bytes: int,
                 send_error: ErrorSender, allowed_hosts: frozenset[str] | None = None):
        self.app, self.keys, self.limiter = app, keys, limiter
        self.max_body_bytes = max_body_bytes
        self.send_error = send_error
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_host(scope)
            if route_path(scope).startswith("/v1"):
                self._admit(scope)
            receive = await self._bounded_body(scope, receive)
        except APIError as error:
            await self.send_error(error, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_host(self, scope: Scope) -> None:
        if self.allowed_hosts is None:
            return
        host = header(scope, b"host")
        if host_name(host) not in self.allowed_hosts:
            raise APIError(403, f"Host {host!r} is not allowed; start the server with --allowed-host "
                                f"{host_name(host) or 'NAME'} to answer it", type="invalid_request_error",
                           code="host_not_allowed")

    def _admit(self, scope: Scope) -> None:
        token = bearer_token(scope)
        valid = not self.keys.enabled or bool(token and self.keys.valid(token))
        if self.limiter is not None:
            # A valid key has its bucket; anything else is limited by address, so refused keys
            # count too (guessing keys is rate limited).
            client = token if self.keys.enabled and valid else (scope.get("client") or ("?",))[0]
            wait = self.limiter.retry_after(client)
            if wait > 0:
                raise APIError(429, f"Rate limit reached ({self.limiter.rate:g} requests/s); retry in {wait:.2f} s",
                               type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})
        if not valid:
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _bounded_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body up to the bound (413 past it), then replay it to the app; later
        receives (the disconnect) go to the server as usual."""
        too_large = APIError(413, f"The request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise too_large
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed
