"""`ThreadChooser`: how many intra-op threads a small decode step runs on, decided by timing the steps.

On two cores, small GEMMs (fbgemm's int8 above all) run faster on two threads than on one only
while this process keeps no more OpenMP threads than CPUs: every thread that has run parallel
torch work (the one that loaded the model, a notebook's main thread) keeps a pool of its own,
and libgomp then stops spinning and puts workers to sleep between regions, which makes two
threads 1.5-2x slower than one (measured, docs/performance-notes.md). Which case holds depends
on what else ran in the process, so the engine measures: per size of step it alternates one and
all threads for a few steps, keeps the faster, and measures again every so often.
"""
from __future__ import annotations

import statistics
from collections import deque

MAX_ADAPTIVE_TOKENS = 16  # larger steps always take every thread (their GEMMs split well)
TRIALS = 5  # timed steps per candidate before a choice
REMEASURE_EVERY = 500  # steps of one size between two measurements
# One thread only when clearly faster: step times jitter by 10-20% on a shared machine, and a
# wrong "one" costs more than a wrong "all" (measured: 0.55x vs 0.9x of the better choice).
ONE_THREAD_MARGIN = 0.9


def bucket(tokens: int) -> int:
    """Steps are grouped by token count rounded up to a power of two."""
    return 1 << max(0, tokens - 1).bit_length()


class ThreadChooser:
    """threads_for(tokens, available) before a step, record(tokens, threads, seconds) after it."""

    def __init__(self, trials: int = TRIALS, remeasure_every: int = REMEASURE_EVERY) -> None:
        self.trials = trials
        self.remeasure_every = remeasure_every
        self._times: dict[tuple[int, int], deque[float]] = {}  # (bucket, threads) -> recent step times
        self._chosen: dict[int, int] = {}  # bucket -> threads
        self._since: dict[int, int] = {}  # bucket -> steps since the choice

    def threads_for(self, tokens: int, available: int) -> int:
        if available <= 1 or tokens > MAX_ADAPTIVE_TOKENS:
            return available
        size = bucket(tokens)
        chosen = self._chosen.get(size)
        if chosen is not None and chosen in (1, available):
            self._since[size] += 1
            if self._since[size] < self.remeasure_every:
                return chosen
            del self._chosen[size]  # measure again: the process may have changed
            for threads in (1, available):
                self._times.pop((size, threads), None)
        one, many = (len(self._times.get((size, t), ())) for t in (1, available))
        return 1 if one <= many else available

    def record(self, tokens: int, threads: int, seconds: float, available: int) -> None:
        if available <= 1 or tokens > MAX_ADAPTIVE_TOKENS:
            return
        size = bucket(tokens)
        if size in self._chosen:
            return
        self._times.setdefault((size, threads), deque(maxlen=self.trials)).append(seconds)
        one, many = self._times.get((size, 1), ()), self._times.get((size, available), ())
        if len(one) >= self.trials and len(many) >= self.trials:
            faster = statistics.median(one) < ONE_THREAD_MARGIN * statistics.median(many)
            self._chosen[size] = 1 if faster else available
            self._since[size] = 0

    def choices(self) -> dict[int, int]:
        """Step size bucket -> the threads chosen for it (for stats and tests)."""
        return dict(self._chosen)
