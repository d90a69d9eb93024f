"""Serving metrics from timestamped request records, with vLLM's benchmark names.

TTFT: start to first token. ITL: gaps between successive tokens of a request (all requests
pooled). TPOT: per request, (e2el - ttft) / (output tokens - 1). E2EL: start to last event.
Throughputs divide by the wall time of the whole run.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from jupyter_llm.bench.targets import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(name: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    nan = float("nan")
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else nan,
           f"median_{name}_ms": statistics.median(ms) if ms else nan,
           f"std_{name}_ms": statistics.pstdev(ms) if ms else nan}
    out.update({f"p{q}_{name}_ms": percentile(ms, q) for q in PERCENTILES})
    return out


def compute_metrics(records: Sequence[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens for r in ok)
    errors = [r.error for r in records if not r.ok]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", [r.e2el for r in ok])):
        metrics.update(_summary(name, values))
    return metrics
