"""The benchmark over HTTP against our own server, cross-checked with the server's own
/metrics: mean TTFT and token throughput agree within 10%."""
from __future__ import annotations

import re

import httpx
import pytest

from jupyter_llm.bench import BackendTarget, HTTPTarget, run_benchmark, synthetic
from jupyter_llm.server.metrics import PREFIX


def scrape(url: str) -> dict[str, float]:
    """Sum every sample of each metric name (over labels) from the Prometheus text."""
    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if match and match.group(2) != "NaN":
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals


@pytest.fixture(scope="module")
def own_server(manager, embedded_model):
    """Our server over the embedded model on native: a real model, so that TTFT is not dominated
    by the fixed cost of an HTTP round trip (which the server cannot see)."""
    from jupyter_llm.server.launcher import start_server
    from jupyter_llm.server.settings import ServerSettings

    manager.load("native", name="bench-native", progress=False)
    handle = start_server(manager, ServerSettings(port=0))
    yield handle.url
    handle.stop()


def test_bench_over_http_agrees_with_server_metrics(manager, own_server):
    workload = synthetic(12, (8, 24), 16, seed=3)
    before = scrape(own_server)
    target = HTTPTarget(own_server + "/v1", model="bench-native", label="own server")
    result = run_benchmark([target], workload, concurrency=[4], warmup=0, progress=False)
    after = scrape(own_server)
    [row] = result.rows
    assert row["completed"] == 12 and row["errors"] == 0
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    server_ttft = (delta[PREFIX + "time_to_first_token_seconds_sum"]
                   / delta[PREFIX + "time_to_first_token_seconds_count"])
    assert delta[PREFIX + "time_to_first_token_seconds_count"] == 12
    assert row["mean_ttft_ms"] / 1000 == pytest.approx(server_ttft, rel=0.10)
    server_tokens = delta[PREFIX + "generation_tokens_total"]
    assert server_tokens == row["total_output_tokens"] == 12 * 16
    assert row["output_throughput"] == pytest.approx(server_tokens / row["duration_s"], rel=0.10)


def test_bench_runs_in_process_and_over_http_side_by_side(manager, own_server):
    result = run_benchmark([BackendTarget(manager, "bench-native"),
                            HTTPTarget(own_server, model="bench-native", label="http")],
                           synthetic(6, 8, 6), concurrency=[1, 3], progress=False)
    assert [(r["target"], r["completed"], r["errors"]) for r in result.rows] == [
        ("bench-native", 6, 0), ("http", 6, 0), ("bench-native", 6, 0), ("http", 6, 0)]
