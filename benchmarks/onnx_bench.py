"""ONNX Runtime GenAI benchmark: the embedded SmolLM2-135M exported to fp32, int8 and int4,
speed beside quality, so that users can choose a precision.

Per precision (greedy decoding, EOS ignored for the speed rows):

  single      one request of --tokens tokens: decode tokens/s after the first token
  batch       --batch requests of --tokens tokens submitted at once (one static batch):
              output tokens/s over the wall time
  exact match greedy completions of short factual prompts whose first word must be the
              answer ("The capital of France is" -> "Paris")
  perplexity  of a fixed text (three short paragraphs: science, code, a letter), from the
              model's logits over the whole text

Speeds are the median of --repeats runs, the precisions interleaved (fp32 int8 int4 fp32
...) so that a change in the machine's load hits all of them alike. Exports are cached (the user's model cache), so
only the first run pays for them (about 10 s each).

    python benchmarks/onnx_bench.py            # the full run (a few minutes)
    python benchmarks/onnx_bench.py --quick    # small sizes, one repeat

Results are printed and saved as benchmarks/results/onnx_bench-<date>[-quick].json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jupyter_llm.bench.machine import machine_info  # noqa: E402
from jupyter_llm.params import SamplingParams  # noqa: E402
from jupyter_llm.render import table_bundle  # noqa: E402

PRECISIONS = ("fp32", "int8", "int4")
FACTS = [
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The largest planet in the solar system is", "Jupiter"),
    ("Water is made of hydrogen and", "oxygen"), ("The chemical symbol for gold is", "Au"),
    ("Monday, Tuesday, Wednesday,", "Thursday"), ("One, two, three, four,", "five"),
    ("The opposite of hot is", "cold"), ("The first president of the United States was", "George"),
    ("The Earth revolves around the", "Sun"), ("Romeo and Juliet was written by William", "Shakespeare"),
]
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
PROMPTS = ["Once upon a time", "The history of the Roman Empire", "def quicksort(items):", "My favourite recipe is",
           "In a distant galaxy", "The best way to learn a language", "Dear hiring manager,", "Photosynthesis is"]


def first_word(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return words[0].lower() if words else ""


def exact_match(manager: Any, name: str) -> tuple[int, int]:
    """(right, asked): greedy completions whose first word is the expected answer."""
    completions = manager.generate([p for p, _ in FACTS], SamplingParams(max_tokens=4, temperature=0), backend=name)
    right = sum(first_word(c.text) == answer.lower() for c, (_, answer) in zip(completions, FACTS))
    return right, len(FACTS)


def perplexity(backend: Any, text: str = PARAGRAPH) -> float:
    """exp(mean negative log-likelihood) of each token of `text` given the ones before it."""
    import numpy as np
    import onnxruntime_genai as og

    ids = backend.tokenizer.encode(text)
    params = og.GeneratorParams(backend.og_model)
    params.set_search_options(batch_size=1, max_length=len(ids) + 1)
    generator = og.Generator(backend.og_model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    logits = generator.get_output("logits")[0, :-1].astype(np.float64)  # position i predicts token i + 1
    top = logits.max(axis=-1, keepdims=True)
    logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    return float(math.exp(-logprobs[np.arange(len(ids) - 1), ids[1:]].mean()))


def single_stream(manager: Any, name: str, tokens: int) -> float:
    [c] = manager.generate(PROMPTS[0], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), backend=name)
    return c.timings.decode_tokens_per_s or 0.0


def batched(manager: Any, name: str, tokens: int, batch: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    start = time.perf_counter()
    completions = manager.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                                   backend=name)
    return sum(c.completion_tokens for c in completions) / (time.perf_counter() - start)


def measure(manager: Any, precisions: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load every precision, then time them interleaved (A B C A B C ...) so that a change in
    the machine's load hits all of them alike; then the quality checks."""
    names, load_s = {}, {}
    for precision in precisions:
        names[precision] = f"onnx-bench-{precision}"
        start = time.perf_counter()
        manager.load("onnx", name=names[precision], precision=precision, progress=not args.quiet,
                     **({"threads": args.threads} if args.threads else {}))
        load_s[precision] = time.perf_counter() - start
    try:
        for name in names.values():
            manager.generate("Hello", SamplingParams(max_tokens=4), backend=name)  # warm-up
        single: dict[str, list[float]] = {p: [] for p in precisions}
        batch: dict[str, list[float]] = {p: [] for p in precisions}
        for _ in range(args.repeats):
            for precision, name in names.items():
                single[precision].append(single_stream(manager, name, args.tokens))
            for precision, name in names.items():
                batch[precision].append(batched(manager, name, args.tokens, args.batch))
        rows = []
        for precision, name in names.items():
            right, asked = exact_match(manager, name)
            rows.append({"precision": precision, "single tok/s": round(statistics.median(single[precision]), 1),
                         f"batch-{args.batch} tok/s": round(statistics.median(batch[precision]), 1),
                         "exact match": f"{right}/{asked}", "perplexity": round(perplexity(manager.get(name)), 2),
                         "load s": round(load_s[precision], 1)})
        return rows
    finally:
        for name in names.values():
            manager.unload(name)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32,int8,int4")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--batch", type=int, default=16, help="requests in the batched run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per speed measure (median)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: every core)")
    parser.add_argument("--quick", action="store_true", help="32 tokens, one repeat")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 32, 1

    from jupyter_llm import get_manager

    manager = get_manager()
    rows = measure(manager, [p.strip() for p in args.precisions.split(",") if p.strip()], args)
    title = (f"ONNX Runtime GenAI, embedded SmolLM2-135M, CPU: {args.tokens} greedy tokens per request, "
             f"median of {args.repeats}")
    print(table_bundle(rows, title=title)["text/plain"])
    if not args.no_save:
        save(rows, args, title)
    return rows


def save(rows: list[dict[str, Any]], args: argparse.Namespace, title: str) -> None:
    from importlib.metadata import version

    folder = ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"onnx_bench-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}"
    info = machine_info()
    info["versions"]["onnxruntime-genai"] = version("onnxruntime-genai")
    record = {"title": title, "settings": {k: v for k, v in vars(args).items() if k not in ("no_save", "quiet")},
              "machine": info, "rows": rows}
    (folder / f"{stem}.json").write_text(json.dumps(record, indent=2))
    columns = list(rows[0])
    lines = [f"# {title}", "", f"Machine: {info['cpu']}, {info['cores']} cores; onnxruntime-genai "
             f"{info['versions']['onnxruntime-genai']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"saved {folder / stem}.json and .md")


if __name__ == "__main__":
    main()
