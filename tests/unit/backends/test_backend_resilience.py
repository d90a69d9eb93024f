"""Retry-After parsing, backoff and the circuit breaker, with a fake clock and fake sends
(the real HTTP path is in tests/integration/test_openai_backend_resilience.py)."""
from __future__ import annotations

import asyncio
import email.utils

import httpx
import pytest

from jupyter_llm.backends.openai.resilience import CircuitBreaker, RetryPolicy, retry_after_seconds, send_with_retries
from jupyter_llm.errors import BackendError, CircuitOpenError

FAST = RetryPolicy(max_retries=3, backoff=0.001, max_backoff=0.002, max_wait=1.0)


def test_retry_after_in_both_forms():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    date = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert retry_after_seconds(date, now=1000.0) == pytest.approx(30, abs=1)
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0.0


def test_backoff_doubles_and_is_capped():
    policy = RetryPolicy(backoff=1.0, max_backoff=3.0)
    assert 0.8 <= policy.delay(0) <= 1.2 and 1.6 <= policy.delay(1) <= 2.4 and policy.delay(5) <= 3.6
    assert policy.delay(4, retry_after=0.25) == 0.25


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_the_threshold_and_half_opens_after_the_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        breaker.record_failure("refused")
    assert breaker.state == "closed"
    breaker.record_failure("refused")
    assert breaker.state == "open" and "retrying in 10 s" in breaker.describe()
    with pytest.raises(CircuitOpenError, match="Failing fast"):
        breaker.admit()
    clock.now = 10.5
    assert breaker.state == "half-open"
    assert breaker.admit() is True  # let through: the trial
    breaker.record_failure("refused again")  # the trial failed: open again at once
    assert breaker.state == "open"
    clock.now = 21
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0


def response(status: int, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers or {}, request=httpx.Request("POST", "http://x"))


def run_sends(outcomes: list, policy: RetryPolicy = FAST, breaker: CircuitBreaker | None = None):
    breaker = breaker or CircuitBreaker()
    calls = []

    async def send():
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    result = asyncio.run(send_with_retries(send, policy, breaker, "http://x"))
    return result, calls


def test_429_and_503_are_retried_then_answered():
    result, calls = run_sends([response(429, {"retry-after": "0"}), response(503), response(200)])
    assert result.status_code == 200 and len(calls) == 3


def test_retries_give_up_and_hand_back_the_last_answer():
    result, calls = run_sends([response(503)] * 4)
    assert result.status_code == 503 and len(calls) == 4


def test_a_retry_after_longer_than_max_wait_is_not_waited_for():
    result, calls = run_sends([response(429, {"retry-after": "60"}), response(200)])
    assert result.status_code == 429 and len(calls) == 1


def test_connection_failures_retry_then_fail_clearly():
    refused = httpx.ConnectError("connection refused")
    result, _calls = run_sends([refused, response(200)])
    assert result.status_code == 200
    with pytest.raises(BackendError, match="cannot reach the upstream server after 4 attempt") as raised:
        run_sends([refused] * 4)
    assert "http://x" not in str(raised.value) and "refused" not in str(raised.value)  # the log's, not the client's


def test_the_breaker_stops_retries_and_then_fails_fast():
    breaker = CircuitBreaker(threshold=2, cooldown=60)
    refused = httpx.ConnectError("connection refused")
    with pytest.raises(BackendError, match="after 2 attempt"):
        run_sends([refused] * 4, breaker=breaker)
    with pytest.raises(CircuitOpenError):
        run_sends([response(200)], breaker=breaker)


def test_half_open_lets_one_trial_through_and_fails_the_others_fast():
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock)
    breaker.record_failure("refused")
    clock.now = 11
    assert breaker.admit() is True  # the trial
    with pytest.raises(CircuitOpenError, match="trial"):
        breaker.admit()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.admit() is False


def test_a_trial_that_ends_without_an_answer_frees_the_slot():
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock)
    breaker.record_failure("refused")
    clock.now = 11

    async def cancelled():
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(send_with_retries(cancelled, FAST, breaker, "http://x"))
    assert breaker.state == "half-open" and breaker.admit() is True  # the next request is the trial


def test_concurrent_requests_in_half_open_send_one_trial():
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock)
    breaker.record_failure("refused")
    clock.now = 11
    sent = []

    async def slow_send():
        sent.append(1)
        await asyncio.sleep(0.05)
        return response(200)

    async def both():
        return await asyncio.gather(*(send_with_retries(slow_send, FAST, breaker, "http://x") for _ in range(3)),
                                    return_exceptions=True)

    results = asyncio.run(both())
    assert len(sent) == 1 and breaker.state == "closed"
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 2


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_errors_count_towards_opening(status):
    breaker = CircuitBreaker(threshold=2, cooldown=60)
    for _ in range(2):
        result, _calls = run_sends([response(status)], breaker=breaker)
        assert result.status_code == status  # handed back, not retried
    assert breaker.state == "open"


def test_a_client_error_is_an_answer_not_a_failure():
    breaker = CircuitBreaker(threshold=1, cooldown=60)
    run_sends([response(400)], breaker=breaker)
    assert breaker.state == "closed"


def test_a_read_timeout_while_opening_counts_and_is_a_clear_error():
    breaker = CircuitBreaker(threshold=1, cooldown=60)
    with pytest.raises(BackendError, match="did not answer"):
        run_sends([httpx.ReadTimeout("timed out")], breaker=breaker)
    assert breaker.state == "open"
