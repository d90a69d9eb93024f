"""Soak: a real `jupyter-llm serve` under mixed traffic for a long while, some of its clients
hostile, its resident memory sampled (issue 19).

`--concurrency` closed-loop clients for `--duration` seconds: a `--misbehaving` fraction of them
drop the connection mid-stream (after the first chunk) or stall (stop reading a long streamed
answer, on a small receive buffer, until the server's --stream-write-timeout gives up on them),
in turn, over raw sockets; the others send well-behaved completions and chats, streamed and
whole, with varied prompts and lengths, and check every answer (status 200, no error event,
`data: [DONE]` at the end of a stream, tokens counted). The server's resident memory is sampled
every `--sample-every` seconds.

Pass: 0 errors for well-behaved clients, and no growth of resident memory after the warm-up
beyond 5%: the peak after the warm-up against the peak during it (the warm-up: the first minute,
or the first 10% of the run when that is shorter, at least one sample). After the traffic the
server must show nothing running and its KV cache as it was at the start.

The KV pool is reserved at load and becomes resident as its blocks are first written, and the
prefix cache keeps every full block until the pool is full: resident memory grows until the
pool has been written all over, which is no leak. So the pool must fill during the warm-up.
The embedded model's default pool (1 GiB on CPU, about 23k float32 tokens of SmolLM2-135M) does:
the stalled clients alone ask for 4 x 3,000 tokens each. The tiny random Llama's tokens are 90x
smaller: it gets a 16 MiB pool (32k tokens) unless `--kv-cache-memory` says otherwise.

    python benchmarks/soak_bench.py                                   # native + embedded SmolLM2, 10 min, 32 clients
    python benchmarks/soak_bench.py --duration 90 --model tiny-random --concurrency 8   # a smoke run

Prints a markdown table and saves benchmarks/results/soak_bench-<date>[-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jupyter_llm.bench.machine import machine_info, machine_line
from jupyter_llm.bench.workload import synthetic

RESULTS = Path(__file__).parent / "results"
HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"
WELL_BEHAVED = ("completion-stream", "completion", "chat-stream", "chat")
MAX_GROWTH = 0.05


def rss_of(pid: int) -> int:
    """The resident memory of a process, in bytes (psutil, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise


class Soak:
    def __init__(self, url: str, model: str, args: argparse.Namespace):
        self.url, self.model, self.args = url, model, args
        parts = url.removeprefix("http://").split(":")
        self.host, self.port = parts[0], int(parts[1])
        # varied prompts: 4 to --prompt-words words of common English
        pool = synthetic(num_prompts=512, prompt_len=(4, args.prompt_words), seed=0)
        self.prompts = [r.prompt for r in pool.requests]
        self.done: Counter[str] = Counter()
        self.errors: list[str] = []  # of well-behaved clients
        self.deadline = 0.0

    # --- what to send -----------------------------------------------------------------------
    def body(self, rng: random.Random, kind: str) -> tuple[str, dict[str, Any]]:
        words = rng.choice(self.prompts)
        body: dict[str, Any] = {"model": self.model, "max_tokens": rng.randint(4, self.args.max_tokens),
                                "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
        if kind.startswith("chat"):
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": words}]
        else:
            path, body["prompt"] = "/v1/completions", words
        if kind.endswith("stream"):
            body.update(stream=True, stream_options={"include_usage": True})
        return path, body

    # --- well-behaved clients -------------------------------------------------------------------
    async def well_behaved(self, client: Any, slot: int) -> None:
        rng = random.Random(slot)
        while time.monotonic() < self.deadline:
            kind = WELL_BEHAVED[rng.randrange(len(WELL_BEHAVED))]
            path, body = self.body(rng, kind)
            try:
                problem = await (self._stream(client, path, body) if body.get("stream")
                                 else self._whole(client, path, body))
            except Exception as error:  # noqa: BLE001 (every failure of a well-behaved client is a result)
                problem = f"{type(error).__name__}: {error}"
            self.done[kind] += 1
            if problem:
                self.errors.append(f"{kind}: {problem}"[:300])

    @staticmethod
    def _check_end(finish: str | None, tokens: int, body: dict) -> str | None:
        """A sample ends with "stop" (end of text: possibly at once) or "length" at max_tokens."""
        if finish == "length" and tokens != body["max_tokens"]:
            return f"finish_reason length after {tokens} of {body['max_tokens']} tokens"
        return None if finish in ("stop", "length") else f"finish_reason {finish!r}"

    async def _whole(self, client: Any, path: str, body: dict) -> str | None:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        answer = response.json()
        return self._check_end(answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"], body)

    async def _stream(self, client: Any, path: str, body: dict) -> str | None:
        events = []
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data = line[5:].strip()
                    events.append(data if data == "[DONE]" else json.loads(data))
        if not events or events[-1] != "[DONE]":
            return "the stream did not end with [DONE]"
        if any("error" in e for e in events[:-1]):
            return f"error event: {next(e for e in events if 'error' in e)['error']}"
        usage = events[-2].get("usage") if len(events) > 1 else None
        if not usage:
            return "no usage before [DONE]"
        finish = [c.get("finish_reason") for e in events[:-1] for c in e.get("choices") or [] if c.get("finish_reason")]
        if len(finish) != 1:
            return f"finish reasons {finish}"
        return self._check_end(finish[0], usage["completion_tokens"], body)

    # --- misbehaving clients --------------------------------------------------------------------
    def _request(self, body: dict, path: str) -> bytes:
        payload = json.dumps(body).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload

    async def misbehaving(self, slot: int) -> None:
        rng = random.Random(1_000_003 * (slot + 1))
        turn = slot  # half of them start with a stall
        while time.monotonic() < self.deadline:
            kind = "drop" if turn % 2 == 0 else "stall"
            turn += 1
            try:
                await (self._drop(rng) if kind == "drop" else self._stall(rng))
            except (OSError, asyncio.TimeoutError):
                pass  # the server hung up on a stalled client: what it is for
            self.done[kind] += 1

    async def _drop(self, rng: random.Random) -> None:
        path, body = self.body(rng, rng.choice(["completion-stream", "chat-stream"]))
        body["max_tokens"] = self.args.max_tokens * 4  # long: the drop comes mid-stream
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self._request(body, path))
            await writer.drain()
            seen = b""
            while b"data:" not in seen:
                chunk = await asyncio.wait_for(reader.read(4096), timeout=120)
                if not chunk:
                    return
                seen += chunk
        finally:
            writer.transport.abort()  # gone without a word, the rest unread

    async def _stall(self, rng: random.Random) -> None:
        """A streamed chat of 4 samples whose chunks (~1 KB a token, with 20 logprobs) fill the
        socket buffers (MBs on loopback), then nothing read for --stall-for seconds: the server's
        write timeout should give up on it first."""
        path, body = self.body(rng, "chat-stream")
        body.update(max_tokens=self.args.stall_tokens, n=4, logprobs=True, top_logprobs=20, ignore_eos=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        _, writer = await asyncio.open_connection(sock=sock, limit=1024)  # reading pauses past 2 KiB
        try:
            writer.write(self._request(body, path))
            await writer.drain()
            await asyncio.sleep(min(self.args.stall_for, max(0.0, self.deadline - time.monotonic())))
        finally:
            writer.transport.abort()


async def sample_memory(pid: int, every: float, started: float, until: float, samples: list) -> None:
    while True:
        samples.append((round(time.monotonic() - started, 1), rss_of(pid)))
        if time.monotonic() + every > until:
            return
        await asyncio.sleep(every)


def gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("jupyter_llm:num_requests_running", "jupyter_llm:num_requests_waiting",
                               "jupyter_llm:kv_cache_blocks_used"):
                out[sample.name.split(":")[1]] = sample.value
            elif sample.name == "jupyter_llm:request_errors_total":
                out["errors_" + sample.labels.get("code", "?")] = sample.value
    return out


async def soak(url: str, model: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    runner = Soak(url, model, args)
    bad = round(args.concurrency * args.misbehaving)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        before = gauges((await client.get("/metrics")).text)
        started = time.monotonic()
        runner.deadline = started + args.duration
        samples: list[tuple[float, int]] = []
        tasks = [asyncio.ensure_future(runner.misbehaving(i)) for i in range(bad)]
        tasks += [asyncio.ensure_future(runner.well_behaved(client, i)) for i in range(args.concurrency - bad)]
        sampler = asyncio.ensure_future(sample_memory(pid, args.sample_every, started, runner.deadline, samples))
        await asyncio.gather(*tasks, sampler)
        elapsed = time.monotonic() - started
        settle_by = time.monotonic() + args.stream_write_timeout + 30
        while True:  # every client gone: the server must come back to where it started
            after = gauges((await client.get("/metrics")).text)
            settled = after.get("num_requests_running") == 0 == after.get("num_requests_waiting") and \
                after.get("kv_cache_blocks_used") == before.get("kv_cache_blocks_used")
            if settled or time.monotonic() > settle_by:
                break
            await asyncio.sleep(0.5)
        health = (await client.get("/health")).status_code
    return {"done": dict(runner.done), "errors": runner.errors, "misbehaving_clients": bad,
            "well_behaved_clients": args.concurrency - bad, "elapsed_s": round(elapsed, 1), "rss": samples,
            "rss_after_settle": rss_of(pid), "metrics_before": before, "metrics_after": after,
            "settled": settled, "health_after": health}


def verdict(run: dict[str, Any], duration: float, every: float) -> dict[str, Any]:
    samples = run["rss"]
    warmup_s = max(every, min(60.0, 0.1 * duration))
    warm = [r for t, r in samples if t <= warmup_s] or [samples[0][1]]
    later = [r for t, r in samples if t > warmup_s]
    baseline = max(warm)
    peak = max(later, default=baseline)
    end = later[-1] if later else baseline
    growth, end_growth = (peak - baseline) / baseline, (end - baseline) / baseline
    well_errors = len(run["errors"])
    passed = well_errors == 0 and growth <= MAX_GROWTH and run["settled"] and run["health_after"] == 200
    return {"warmup_s": warmup_s, "baseline_rss": baseline, "peak_rss_after_warmup": peak, "end_rss": end,
            "growth": growth, "end_growth": end_growth, "well_behaved_errors": well_errors, "passed": passed}


def mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def markdown(config: dict, machine: dict, run: dict, result: dict) -> str:
    done, after, before = run["done"], run["metrics_after"], run["metrics_before"]
    title = (f"## soak_bench {config['date']}: {config['backend']} · {config['model']} · {run['elapsed_s']:.0f} s · "
             f"{config['concurrency']} clients ({run['misbehaving_clients']} misbehaving)")
    lines = [title, "", f"Machine: {machine_line(machine)}", "", "| kind | requests done |", "|---|---|"]
    lines += [f"| {kind} | {done.get(kind, 0)} |" for kind in (*WELL_BEHAVED, "drop", "stall")]
    timeouts = after.get("errors_stream_write_timeout", 0) - before.get("errors_stream_write_timeout", 0)
    gone = after.get("errors_client_disconnected", 0) - before.get("errors_client_disconnected", 0)
    lines += ["", "| measure | value |", "|---|---|",
              f"| errors of well-behaved clients | {result['well_behaved_errors']} (must be 0) |",
              f"| streams cancelled by the write timeout ({config['stream_write_timeout']} s) | {timeouts:.0f} |",
              f"| requests ended by a client that left | {gone:.0f} |",
              f"| RSS peak during the warm-up (first {result['warmup_s']:.0f} s) | {mib(result['baseline_rss'])} MiB |",
              f"| RSS peak after the warm-up | {mib(result['peak_rss_after_warmup'])} MiB |",
              f"| growth after the warm-up (peak; at most +{100 * MAX_GROWTH:.0f}%) | {100 * result['growth']:+.2f}% |",
              f"| growth at the end | {100 * result['end_growth']:+.2f}% |",
              f"| RSS once settled | {mib(run['rss_after_settle'])} MiB |",
              f"| afterwards: nothing running, KV as before, /health | {run['settled']}, {run['health_after']} |",
              f"| **result** | **{'PASS' if result['passed'] else 'FAIL'}** |", "",
              "RSS samples (s: MiB): " + ", ".join(f"{t:.0f}: {mib(r)}" for t, r in run["rss"])]
    if run["errors"]:
        lines += ["", "First errors of well-behaved clients:", *[f"- {e}" for e in run["errors"][:10]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="native")
    parser.add_argument("--model", help="a model (default: the embedded one), or tiny-random: the tests' tiny Llama")
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--misbehaving", type=float, default=0.10, help="fraction of the clients (default 0.10)")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between RSS samples (default 10)")
    parser.add_argument("--stream-write-timeout", type=float, default=5.0, help="the server's (default 5 s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens of a well-behaved request")
    parser.add_argument("--prompt-words", type=int, default=128, help="most words of a prompt")
    parser.add_argument("--stall-tokens", type=int, default=3000, help="tokens a stalled client asks for, x 4")
    parser.add_argument("--stall-for", type=float, default=60, help="seconds a stalled client holds on")
    parser.add_argument("--kv-cache-memory", metavar="SIZE",
                        help="the server's KV pool (default: the backend's; 16MiB for tiny-random), small enough "
                             "to be written all over during the warm-up (see the module's docstring)")
    parser.add_argument("--threads", type=int, help="the backend's compute threads")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", help="appended to the result files' names")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not 0 <= args.misbehaving < 1 or args.concurrency < 1:
        parser.error("--misbehaving must be in [0, 1) and --concurrency >= 1")

    sys.path.insert(0, str(HELPERS))
    from server_processes import CLIServer

    model = args.model
    if model == "tiny-random":
        from tiny_models import tiny_llama_folder

        model = str(tiny_llama_folder(Path(tempfile.mkdtemp()) / "tiny-random", max_position_embeddings=4096))
    serve = ["--backend", args.backend, "--name", "soak", "--port", "0",
             "--stream-write-timeout", str(args.stream_write_timeout), *(["--model", model] if model else []),
             *(["--threads", str(args.threads)] if args.threads else [])]
    if args.kv_cache_memory is None and args.model == "tiny-random":
        args.kv_cache_memory = "16MiB"  # 32k of its tokens: filled in seconds
    for item in [f"kv_cache_memory={args.kv_cache_memory}"] * bool(args.kv_cache_memory) + args.backend_option:
        serve += ["--backend-option", item]
    server = CLIServer(serve, timeout=900)
    try:
        run = asyncio.run(soak(server.url, "soak", server.process.pid, args))
    finally:
        server.stop()
    result = verdict(run, args.duration, args.sample_every)
    date = dt.date.today().isoformat()
    config = {"date": date, "backend": args.backend, "model": args.model or "embedded default",
              "duration_s": args.duration, "concurrency": args.concurrency, "misbehaving": args.misbehaving,
              "sample_every_s": args.sample_every, "stream_write_timeout": args.stream_write_timeout,
              "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "stall_tokens": args.stall_tokens,
              "stall_for_s": args.stall_for, "kv_cache_memory": args.kv_cache_memory,
              "threads": args.threads, "backend_options": args.backend_option}
    machine = machine_info()
    text = markdown(config, machine, run, result)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"soak_bench-{date}{'-' + args.tag if args.tag else ''}"
        Path(f"{stem}.json").write_text(json.dumps({"config": config, "machine": machine, "result": result,
                                                    "run": run}, indent=1, default=str))
        Path(f"{stem}.md").write_text(text)
        print(f"saved {stem}.json and .md")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
