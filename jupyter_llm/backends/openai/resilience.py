"""Retries with backoff (honouring Retry-After) and a circuit breaker, for backends that
talk to a server over HTTP.

Only the opening of a request is retried (a refused connection, a 429 or a 503): once
tokens flow, a retry would repeat them. The breaker counts consecutive failures (connections
that fail or time out, 5xx answers, streams that break); past a threshold it opens and
requests fail at once for a cool-down. Then one trial request goes through (half-open): its
answer closes the circuit, its failure reopens it.

Errors say what failed, never where or the exception's text: they may reach the clients of
this project's server. The details (the URL, the exception) go to the log.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from jupyter_llm.errors import BackendError, CircuitOpenError

log = logging.getLogger(__name__)
UPSTREAM = "the upstream server"  # how errors name the server a backend forwards to
RETRY_STATUSES = (429, 503)
# Failures that say nothing reached the server, or the server went away.
CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                     httpx.WriteError)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    backoff: float = 0.5  # first delay; doubles each attempt, with jitter
    max_backoff: float = 8.0
    max_wait: float = 30.0  # a Retry-After longer than this is not waited for

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.8, 1.2)


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures (a connection that fails or times
    out, a 5xx answer); open -> half-open after `cooldown`. Half-open lets one trial request
    through while the others fail fast; its answer closes the circuit, its failure reopens it.
    Thread-safe: status tables read it from other threads."""

    def __init__(self, threshold: int = 5, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0  # consecutive failures
        self.opened_at: float | None = None
        self.last_error = ""
        self.trial = False  # the half-open trial request is in flight
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self.opened_at is None:
                return "closed"
            return "open" if self.clock() - self.opened_at < self.cooldown else "half-open"

    def describe(self) -> str:
        state = self.state
        if state == "open":
            left = self.cooldown - (self.clock() - (self.opened_at or 0))
            return f"open ({self.failures} failed in a row; retrying in {left:.0f} s)"
        return "half-open (a trial request is in flight)" if state == "half-open" and self.trial else state

    def admit(self) -> bool:
        """Let a request through, or raise CircuitOpenError (open, or half-open with the trial in
        flight). True when this request is the half-open trial: it must end in record_success,
        record_failure or release."""
        with self._lock:
            if self.opened_at is None:
                return False
            if self.clock() - self.opened_at >= self.cooldown and not self.trial:
                self.trial = True
                return True
            left = max(0.0, self.cooldown - (self.clock() - self.opened_at))
        reason = "half-open: a trial request is checking whether it recovered" if self.trial else self.describe()
        raise CircuitOpenError(f"{UPSTREAM} is unavailable: its circuit is {reason}. Failing fast until the "
                               f"cool-down ends.", retry_after=left or 1.0)

    def release(self) -> None:
        """The trial ended without an answer (cancelled): the next request is the trial."""
        with self._lock:
            self.trial = False

    def record_success(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self.trial = 0, None, False

    def record_failure(self, error: str) -> None:
        """Count a failure; `error` (its details) is logged when it opens the circuit."""
        with self._lock:
            self.failures += 1
            self.last_error = error
            half_open = self.opened_at is not None  # the trial request after a cool-down failed
            if half_open or self.failures >= self.threshold:
                if not half_open:
                    log.warning("circuit opened after %d failures in a row; the last: %s", self.failures, error)
                self.opened_at = self.clock()
            self.trial = False


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def send_with_retries(send: Callable[[], Awaitable[httpx.Response]], policy: RetryPolicy,
                            breaker: CircuitBreaker, target: str,
                            on_retry: Callable[[str], None] | None = None) -> httpx.Response:
    """Open a request (streamed response), retrying connection failures and 429/503.

    Returns the response of the last attempt, whatever its status; the caller reads or
    closes it. Raises BackendError when the server cannot be reached or does not answer.
    """
    attempt = 0
    while True:
        trial = breaker.admit()
        try:
            response = await send()
        except CONNECTION_ERRORS as error:
            message = error_text(error)
            breaker.record_failure(f"{target}: {message}")
            if attempt >= policy.max_retries or breaker.state == "open":
                log.warning("cannot reach %s after %d attempt(s): %s", target, attempt + 1, message)
                raise BackendError(f"cannot reach {UPSTREAM} after {attempt + 1} attempt(s)") from None
            if on_retry:
                on_retry(message)
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1
            continue
        except httpx.TimeoutException as error:  # connected, but no answer within the read timeout
            breaker.record_failure(f"{target}: {error_text(error)}")
            log.warning("%s did not answer within the read timeout: %s", target, error_text(error))
            raise BackendError(f"{UPSTREAM} did not answer within the read timeout") from None
        except BaseException:
            if trial:
                breaker.release()
            raise
        if response.status_code >= 500:
            breaker.record_failure(f"{target}: HTTP {response.status_code}")
        else:
            breaker.record_success()
        if response.status_code not in RETRY_STATUSES or attempt >= policy.max_retries:
            return response
        wait = retry_after_seconds(response.headers.get("retry-after"))
        if wait is not None and wait > policy.max_wait:
            return response  # the server asks for longer than we wait: report its answer
        await response.aclose()
        if on_retry:
            on_retry(f"HTTP {response.status_code}")
        await asyncio.sleep(policy.delay(attempt, wait))
        attempt += 1
