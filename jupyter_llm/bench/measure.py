"""Runs a workload against several targets at several load levels, fairly on a noisy
machine: at each level the targets run one after the other (A B A B ...), the whole sweep
can repeat, and the result keeps the median over repeats."""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from jupyter_llm.bench.machine import machine_info
from jupyter_llm.bench.metrics import compute_metrics
from jupyter_llm.bench.result import BenchResult
from jupyter_llm.bench.targets import RequestRecord, Target
from jupyter_llm.bench.workload import BenchRequest, Workload


async def run_level(target: Target, requests: Sequence[BenchRequest], concurrency: int | None = None,
                    request_rate: float | None = None, seed: int = 0, on_done=None
                    ) -> tuple[list[RequestRecord], float]:
    """Closed loop (at most `concurrency` in flight) or open loop (Poisson arrivals at
    `request_rate` per second). Returns the records in workload order and the wall time."""

    async def one(request: BenchRequest) -> RequestRecord:
        record = await target.send(request)
        if on_done is not None:
            on_done()
        return record

    started = time.monotonic()
    if request_rate is None:
        gate = asyncio.Semaphore(concurrency or len(requests))

        async def gated(request: BenchRequest) -> RequestRecord:
            async with gate:
                return await one(request)

        records = await asyncio.gather(*(gated(r) for r in requests))
    else:
        rng = random.Random(seed)
        tasks = []
        for request in requests:
            tasks.append(asyncio.ensure_future(one(request)))
            await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
    return list(records), time.monotonic() - started


def speculation_metrics(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float]:
    """Acceptance rate and mean accepted length (tokens per verification) over one run, from
    the engine's speculative counters before and after it; {} for a target that does not speculate."""
    if before is None or after is None:
        return {}
    drafts = after["spec_num_drafts"] - before["spec_num_drafts"]
    proposed = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    nan = float("nan")
    return {"spec_acceptance_rate": accepted / proposed if proposed else nan,
            "spec_mean_accepted_length": (accepted + drafts) / drafts if drafts else nan}


def _median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, level): the median of every numeric metric over the repeats."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["load"]), []).append(run)
    rows = []
    for (target, load), group in groups.items():
        row: dict[str, Any] = {"target": target, "load": load, "load_kind": group[0]["load_kind"],
                               "load_value": group[0]["load_value"], "repeats": len(group)}
        for key, value in group[0].items():
            if key in row or key == "repeat":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers = [g[key] for g in group if g[key] == g[key]]  # drop NaN
                row[key] = statistics.median(numbers) if numbers else float("nan")
            else:
                row[key] = value
        rows.append(row)
    return rows


async def run_benchmark_async(targets: Sequence[Target], workload: Workload, concurrency: Sequence[int] = (1,),
                              request_rate: float | None = None, repeat: int = 1, warmup: int = 1,
                              progress: bool = True, config: dict[str, Any] | None = None) -> BenchResult:
    from jupyter_llm.progress import steps

    levels: list[tuple[str, str, float]] = (
        [("rate", f"{request_rate:g} req/s", request_rate)] if request_rate is not None
        else [("concurrency", f"c={c}", c) for c in concurrency])
    total = len(levels) * repeat * len(targets) * len(workload)
    runs: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    with steps(progress, "Benchmark", total) as bar:
        for target in targets:  # warm-up requests are not counted
            await run_level(target, workload.requests[:warmup], concurrency=warmup or 1)
        for kind, label, value in levels:
            for rep in range(repeat):
                for target in targets:
                    before = target.speculation_counters()
                    records, duration = await run_level(
                        target, workload.requests,
                        concurrency=int(value) if kind == "concurrency" else None,
                        request_rate=value if kind == "rate" else None, seed=rep, on_done=lambda: bar.update(1))
                    runs.append({"target": target.label, "load": label, "load_kind": kind, "load_value": value,
                                 "repeat": rep, **compute_metrics(records, duration),
                                 **speculation_metrics(before, target.speculation_counters())})
                    pool = samples.setdefault(f"{target.label}|{label}", {"ttft_ms": [], "itl_ms": []})
                    pool["ttft_ms"] += [r.ttft * 1000 for r in records if r.ok and r.ttft is not None]
                    pool["itl_ms"] += [(b - a) * 1000 for r in records if r.ok
                                       for a, b in zip(r.token_times, r.token_times[1:])]
    full_config = {"targets": [t.label for t in targets], "concurrency": list(concurrency),
                   "request_rate": request_rate, "repeat": repeat, "warmup": warmup,
                   "workload": workload.description, **(config or {})}
    return BenchResult(config=full_config, machine=machine_info(), rows=_median_rows(runs), runs=runs,
                       samples=samples)


def run_benchmark(targets: Sequence[Target], workload: Workload, concurrency: Sequence[int] = (1,),
                  request_rate: float | None = None, repeat: int = 1, warmup: int = 1, progress: bool = True,
                  config: dict[str, Any] | None = None) -> BenchResult:
    """Blocking: runs on the manager's event loop (so it works inside a running kernel), then
    closes the targets."""
    from jupyter_llm.manager import get_manager

    async def main() -> BenchResult:
        try:
            return await run_benchmark_async(targets, workload, concurrency, request_rate, repeat, warmup,
                                             progress, config)
        finally:
            for target in targets:
                await target.close()

    future = get_manager().submit(main())
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise
