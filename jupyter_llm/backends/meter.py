"""Counts of requests and tokens for every backend's status table: what is running, how many
tokens came back, and the recent token rate."""
from __future__ import annotations

import threading
import time
from collections import deque


class TokenMeter:
    """Thread-safe: the manager's loop or a compute thread writes, status tables read from any thread."""

    def __init__(self, window: float = 5.0):
        self.window = window
        self.running = 0
        self.tokens_generated = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self.running += 1

    def finished(self) -> None:
        with self._lock:
            self.running -= 1

    def add(self, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self.tokens_generated += tokens
            self._recent.append((time.monotonic(), tokens))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > self.window:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
            span = max(now - self._recent[0][0], 1e-3) if self._recent else 0.0
        return round(tokens / span, 1) if tokens > 1 else 0.0  # one token gives no rate
