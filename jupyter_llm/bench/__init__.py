"""Benchmark backends and servers: workloads, targets, the runner, metrics, charts.

    from jupyter_llm.bench import BenchResult, BackendTarget, HTTPTarget, run_benchmark, synthetic
    result = run_benchmark([BackendTarget(manager, "native")], synthetic(32, 64, 64), concurrency=[1, 4])
"""
from jupyter_llm.bench.measure import run_benchmark, run_benchmark_async
from jupyter_llm.bench.result import BenchResult
from jupyter_llm.bench.targets import BackendTarget, HTTPTarget, RequestRecord
from jupyter_llm.bench.workload import BenchRequest, Workload, from_file, from_prompts, parse_length, synthetic

__all__ = [
           "BackendTarget",
           "BenchRequest",
           "BenchResult",
           "HTTPTarget",
           "RequestRecord",
           "Workload",
           "from_file",
           "from_prompts",
           "parse_length",
           "run_benchmark",
           "run_benchmark_async",
           "synthetic",
]
