"""Benchmark backends and servers: workloads, targets, the runner, metrics, charts.

    from jupyter_llm.bench import BenchResult, BackendTarget, HTTPTarget, run_benchmark, synthetic
    result = run_benchmark([BackendTarget(manager, "native")], synthetic(32, 64, 64), concurrency=[1, 4])
"""
from .result import BenchResult
from .runner import run_benchmark, run_benchmark_async
from .targets import BackendTarget, HTTPTarget, RequestRecord
from .workload import BenchRequest, Workload, from_file, from_prompts, parse_length, synthetic

__all__ = ["BenchResult", "BackendTarget", "HTTPTarget", "RequestRecord", "BenchRequest", "Workload",
           "run_benchmark", "run_benchmark_async", "synthetic", "from_prompts", "from_file", "parse_length"]
