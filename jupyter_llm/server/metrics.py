"""Prometheus metrics with vLLM's names under the `jupyter_llm:` prefix, one registry per
app. Engine gauges (requests running and waiting, KV cache use, speculative decoding) are
read from the backends' stats at scrape time; latencies and token counts are recorded per
request."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jupyter_llm.schema import Completion, TokenEvent

PREFIX = "jupyter_llm:"
# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class EngineCollector(Collector):
    """Gauges read from every loaded backend's stats() when /metrics is scraped."""

    def __init__(self, manager: Any):
        self.manager = manager

    # Speculative decoding, from a backend's stats: (stats key, metric name, help); counters first.
    SPEC_COUNTERS = (("spec_num_drafts", "spec_decode_num_drafts", "Verifications of speculative guesses"),
                     ("spec_num_draft_tokens", "spec_decode_num_draft_tokens", "Speculative tokens proposed"),
                     ("spec_num_accepted_tokens", "spec_decode_num_accepted_tokens", "Speculative tokens accepted"))
    SPEC_GAUGES = (("spec_acceptance_rate", "spec_decode_draft_acceptance_rate", "Accepted / proposed tokens"),
                   ("spec_mean_accepted_length", "spec_decode_mean_acceptance_length",
                    "Tokens emitted per verification (accepted guesses + 1)"),
                   ("spec_speedup", "spec_decode_speedup",
                    "Measured decode speed with guesses / without, over recent steps"))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Sequences running in the engine",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Sequences waiting to start",
                                    labels=["model_name"])
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)",
                                  labels=["model_name"])
        used = GaugeMetricFamily(PREFIX + "kv_cache_blocks_used", "KV cache blocks in use", labels=["model_name"])
        total = GaugeMetricFamily(PREFIX + "kv_cache_blocks_total", "KV cache blocks", labels=["model_name"])
        infos = self._infos()
        for info in infos:
            running.add_metric([info.name], info.running)
            waiting.add_metric([info.name], info.waiting)
            blocks, capacity = info.extra.get("kv_blocks_used"), info.extra.get("kv_blocks_total")
            if blocks is not None and capacity:  # only backends with a paged KV cache report blocks
                used.add_metric([info.name], blocks)
                total.add_metric([info.name], capacity)
                usage.add_metric([info.name], blocks / capacity)
        yield from (running, waiting, usage, used, total)
        yield from self._speculative(infos)

    def _speculative(self, infos: list[Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """vLLM's spec_decode metrics for backends that speculate (absent otherwise)."""
        families = [(key, CounterMetricFamily(PREFIX + name, text, labels=["model_name"]))
                    for key, name, text in self.SPEC_COUNTERS]
        families += [(key, GaugeMetricFamily(PREFIX + name, text, labels=["model_name"]))
                     for key, name, text in self.SPEC_GAUGES]
        for info in infos:
            for key, family in families:
                value = info.extra.get(key)
                if value is not None:
                    family.add_metric([info.name], value)
        for _, family in families:
            if family.samples:
                yield family

    def _infos(self) -> list[Any]:
        """Every backend's status row; one that cannot say (unloaded meanwhile, a remote one
        unreachable) is left out rather than breaking /metrics."""
        infos = []
        for name in self.manager.names():
            try:
                infos.append(self.manager.info(name))
            except Exception:  # noqa: S112, BLE001 (a backend unloaded meanwhile is not listed)
                continue
        return infos


class ServerMetrics:
    """The app's registry, plus the two plain counts that `%llm_serve --status` shows."""

    def __init__(self, manager: Any):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens",
                             labels, buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency",
                             labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", labels,
                                         registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Samples that finished normally, by reason",
                               labels + ["finished_reason"], registry=self.registry)
        self.failures = Counter(PREFIX + "request_errors", "Requests answered with an error, by error code",
                                ["code"], registry=self.registry)
        self.registry.register(EngineCollector(manager))
        self.requests_served = 0
        self.errors = 0

    def error(self, code: str) -> None:
        self.errors += 1
        self.failures.labels(code).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, model: str) -> RequestTracker:
        return RequestTracker(self, model)


class RequestTracker:
    """Times one HTTP request's samples as their events arrive (events carry the time the
    backend produced them)."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.started = time.monotonic()
        self._last: dict[tuple[int, int], float] = {}
        self._ttft, self._itl = metrics.ttft.labels(model), metrics.itl.labels(model)

    def event(self, event: TokenEvent) -> None:
        if not event.token_ids:
            return
        key = (event.prompt_index, event.index)
        last = self._last.get(key)
        if last is None:
            self._ttft.observe(max(0.0, event.timestamp - self.started))
        else:
            self._itl.observe(max(0.0, event.timestamp - last))
        self._last[key] = event.timestamp

    def finished(self, completions: list[Completion], prompt_tokens: int) -> None:
        """Count tokens (also those of a request cut short) and, when every sample finished
        normally, the request's latency and success."""
        m, model = self.metrics, self.model
        m.prompt_tokens.labels(model).inc(prompt_tokens)
        m.generation_tokens.labels(model).inc(sum(c.completion_tokens for c in completions))
        if completions and all(c.finish_reason in ("stop", "length") for c in completions):
            m.e2e.labels(model).observe(time.monotonic() - self.started)
            for c in completions:
                m.success.labels(model, c.finish_reason).inc()
            m.requests_served += 1
