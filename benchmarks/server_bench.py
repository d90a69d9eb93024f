"""Server overhead: one backend, one workload, measured in-process (the manager's stream, as a
notebook cell gets it) and over HTTP (/v1/completions, streamed and whole, through the server
that `%llm_serve` starts in the same process as the engine, called from a client in another
process, as a colleague's script would).

Closed loop at `--concurrency` clients, greedy, EOS ignored so every request makes exactly
`--max-tokens` tokens. The targets alternate (in-process, HTTP streamed, HTTP whole,
in-process, ...) `--repeats` times after a warm-up; the medians are reported. A streamed
answer costs one HTTP chunk per token (a JSON encode, a socket write and a client-side
parse); a whole answer costs one response per request.

    python benchmarks/server_bench.py                                  # native + embedded SmolLM2
    python benchmarks/server_bench.py --model tiny-random              # the tests' tiny random Llama
    python benchmarks/server_bench.py --backend hf --model PATH        # any backend and model

Prints a table and saves benchmarks/results/server_bench-<date>-<backend>-<model>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jupyter_llm.bench.machine import machine_info
from jupyter_llm.bench.measure import run_level
from jupyter_llm.bench.metrics import compute_metrics
from jupyter_llm.bench.targets import BackendTarget, HTTPTarget, RequestRecord
from jupyter_llm.bench.workload import synthetic

RESULTS = Path(__file__).parent / "results"
COLUMNS = [("output_throughput", "output tok/s", "{:.1f}"), ("request_throughput", "req/s", "{:.2f}"),
           ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
           ("median_itl_ms", "ITL p50 ms", "{:.1f}"), ("median_e2el_ms", "E2EL p50 ms", "{:.0f}")]


class WholeHTTPTarget:
    """/v1/completions without streaming: one response per request (no per-token times)."""

    def __init__(self, url: str, model: str):
        import httpx

        self.url, self.model = url.rstrip("/") + "/v1/completions", model
        self.client = httpx.AsyncClient(timeout=1800)

    async def send(self, request) -> RequestRecord:
        record = RequestRecord()
        started = time.monotonic()
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
                "ignore_eos": request.ignore_eos}
        try:
            response = await self.client.post(self.url, json=body)
            response.raise_for_status()
            used = response.json()["usage"]
            record.prompt_tokens, record.output_tokens = used["prompt_tokens"], used["completion_tokens"]
        except Exception as error:  # noqa: BLE001 (a failed request is a result: recorded, not raised)
            record.error = f"{type(error).__name__}: {error}"
        record.end = time.monotonic() - started
        return record

    async def close(self) -> None:
        await self.client.aclose()


def workload(args: argparse.Namespace):
    return synthetic(num_prompts=args.requests, prompt_len=args.prompt_len, max_tokens=args.max_tokens, seed=0)


def measure(target, args: argparse.Namespace) -> dict:
    async def go():
        try:
            records, duration = await run_level(target, workload(args).requests, concurrency=args.concurrency)
        finally:
            await target.close()
        return compute_metrics(records, duration)

    return asyncio.run(go())


def http_in_another_process(url: str, args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, __file__, "--client", url, "--mode", mode, "--concurrency", str(args.concurrency),
               "--requests", str(args.requests), "--prompt-len", str(args.prompt_len),
               "--max-tokens", str(args.max_tokens)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_row(label: str, runs: list[dict]) -> dict:
    row = {"target": label, "runs": len(runs), "errors": sum(r["errors"] for r in runs)}
    for key, _, _ in COLUMNS:
        row[key] = statistics.median(r[key] for r in runs)
    return row


def table(rows: list[dict], ratios: dict[str, float]) -> str:
    head = ["target"] + [title for _, title, _ in COLUMNS]
    cells = [[r["target"]] + [fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    lines += [f"{label} / in-process output throughput: {ratio:.3f}" for label, ratio in ratios.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="native")
    parser.add_argument("--model", default="smollm2-135m", help="a model, or tiny-random: the tests' tiny Llama")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="the backend's compute threads (default: all cores)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the HTTP side, in a subprocess
    parser.add_argument("--mode", choices=("stream", "whole"), default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        target = HTTPTarget(args.client, model="bench") if args.mode == "stream" else WholeHTTPTarget(args.client,
                                                                                                       "bench")
        print(json.dumps(measure(target, args)))
        return 0

    from jupyter_llm.manager import get_manager
    from jupyter_llm.server.launcher import start_server
    from jupyter_llm.server.settings import ServerSettings

    model = args.model
    if model == "tiny-random":  # per-token compute so small that the HTTP costs show
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
        from tiny_models import tiny_llama_folder

        model = str(tiny_llama_folder(Path(tempfile.mkdtemp()) / "tiny-random"))
    manager = get_manager()
    manager.load(args.backend, model, name="bench", progress=False,
                 **({"threads": args.threads} if args.threads else {}))
    server = start_server(manager, ServerSettings(port=0))
    try:
        measure(BackendTarget(manager, "bench"), args)  # warm-up: first allocations, caches
        http_in_another_process(server.url, args, "stream")
        runs: dict[str, list[dict]] = {"in-process": [], "HTTP (stream)": [], "HTTP (whole)": []}
        for _ in range(args.repeats):
            runs["in-process"].append(measure(BackendTarget(manager, "bench"), args))
            runs["HTTP (stream)"].append(http_in_another_process(server.url, args, "stream"))
            runs["HTTP (whole)"].append(http_in_another_process(server.url, args, "whole"))
    finally:
        server.stop()
    rows = [median_row(label, r) for label, r in runs.items()]
    ratios = {row["target"]: row["output_throughput"] / rows[0]["output_throughput"] for row in rows[1:]}
    info = manager.info("bench")
    config = {"backend": args.backend, "model": info.model, "device": info.device, "dtype": info.dtype,
              "threads": manager.get("bench").threads,
              "concurrency": args.concurrency, "requests": args.requests, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "greedy": True, "ignore_eos": True}
    print(f"{args.backend} · {info.model} · {info.device} · {config['threads']} threads · concurrency "
          f"{args.concurrency} · {args.requests} requests x {args.max_tokens} tokens · median of {args.repeats}")
    print(table(rows, ratios))
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in info.model)
    path = RESULTS / f"server_bench-{dt.date.today().isoformat()}-{args.backend}-{model}.json"
    path.write_text(json.dumps({"config": config, "machine": machine_info(), "rows": rows, "ratios": ratios,
                                "runs": runs}, indent=1, default=str))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
