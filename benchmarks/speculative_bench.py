"""Speculative decoding on the native engine: the embedded SmolLM2-135M-Instruct (float32)
without speculation, with n-gram prompt lookup, and with its own int8 copy as the draft model,
all loaded in one process.

Tasks (chat prompts, greedy): three grounded ones, whose answer copies much of the prompt
(summarise a given paragraph, fix the typos of a given text, rewrite a given code snippet
with type hints), and open-ended generation (a story, an explanation). Scenarios:

  single       one request at a time: decode tokens/s (after the first token) per task, the
               acceptance rate and mean accepted length, and whether the greedy output equals
               the one without speculation
  concurrency  every task's prompt, repeated to 16 requests, sent by 1, 4 and 16 closed-loop
               clients: output tokens/s of the whole run

Engines run interleaved (plain, ngram, draft, plain, ...) for every measurement, `--repeats`
times; medians are reported, with the speed-up over plain and the issue's targets:
n-gram >= 1.8x single-stream on grounded tasks (with identical greedy output) and >= 0.9x on
open-ended text; the int8 self-draft faster than plain on open-ended text.

    python benchmarks/speculative_bench.py            # the full run (about 15 minutes)
    python benchmarks/speculative_bench.py --quick    # short outputs, one repeat

Results: benchmarks/results/speculative_bench-<date>[-quick].json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from jupyter_llm.bench.machine import machine_info, machine_line

ENGINES = {
    "plain": {},
    "ngram": {"speculative": "ngram"},
    "draft-int8": {"speculative": "draft", "draft_quantization": "int8"},
}

PARAGRAPH = (
    "The Industrial Revolution began in Britain in the late eighteenth century and spread to Europe and "
    "North America during the nineteenth. It transformed economies that had been based on agriculture and "
    "handicrafts into economies based on large-scale industry, mechanized manufacturing and the factory "
    "system. New machines, new power sources such as coal and steam, and new ways of organizing work made "
    "existing industries far more productive, while railways and steamships moved goods and people faster "
    "than ever before."
)
TYPOS = (  # a letter of about 90 words with six typos
    "Dear Mr Smith, thank you for your letter of last week. We have recieved the documents you sent and "
    "will process your application as soon as possible. The committee meets on the first Monday of every "
    "month, so you can expect a decision by the end of next month. If any document is missing, we will "
    "write to you before the meeting. Please dont hesitate to contact us if you have any questoins about "
    "the next steps, or if your adress changes in the meantime. Best regards, the admisions office."
)
CODE = (
    "def mean(values):\n"
    "    total = 0\n"
    "    for value in values:\n"
    "        total = total + value\n"
    "    return total / len(values)\n\n"
    "def variance(values):\n"
    "    m = mean(values)\n"
    "    return mean([(value - m) ** 2 for value in values])\n"
)
TASKS = {
    "summarise": ("grounded", f"Summarise this paragraph in two sentences, reusing its wording:\n\n{PARAGRAPH}"),
    "fix typos": ("grounded", f"Rewrite this letter with every spelling mistake corrected:\n\n{TYPOS}"),
    "rewrite code": ("grounded", f"Rewrite this Python code with type hints and docstrings:\n\n{CODE}"),
    "story": ("open", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    "explain": ("open", "Explain to a ten-year-old why the sky is blue and sunsets are red."),
}


def load_engines(names: list[str], threads: int, kv: str) -> Any:
    import jupyter_llm as jl

    manager = jl.get_manager()
    for name in names:
        started = time.perf_counter()
        manager.load("native", name=name, progress=False, threads=threads, kv_cache_memory=kv, **ENGINES[name])
        print(f"loaded {name} in {time.perf_counter() - started:.1f} s", flush=True)
    return manager


def spec_counters(manager: Any, name: str) -> dict[str, int] | None:
    from jupyter_llm.bench import BackendTarget

    return BackendTarget(manager, name).speculation_counters()


def acceptance(before: dict[str, int] | None, after: dict[str, int] | None) -> tuple[float | None, float | None]:
    """(acceptance rate, mean accepted length) between two counter snapshots (None where none)."""
    from jupyter_llm.bench.measure import speculation_metrics

    measured = speculation_metrics(before, after)
    values = (measured.get("spec_acceptance_rate"), measured.get("spec_mean_accepted_length"))
    return tuple(None if v is None or math.isnan(v) else v for v in values)  # type: ignore[return-value]


def run_single(manager: Any, names: list[str], tokens: int, repeats: int) -> dict[str, Any]:
    from jupyter_llm.schema import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0)
    out: dict[str, Any] = {}
    for task, (kind, prompt) in TASKS.items():
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:  # interleaved
                before = spec_counters(manager, name)
                [completion] = manager.generate(prompt, params, backend=name, chat=True)
                rate, length = acceptance(before, spec_counters(manager, name))
                runs[name].append({"decode_tok_s": completion.timings.decode_tokens_per_s,
                                   "tokens": len(completion.token_ids), "token_ids": completion.token_ids,
                                   "acceptance": rate, "accepted_length": length})
        reference = runs[names[0]][0]["token_ids"]
        out[task] = {"kind": kind, "engines": {
            name: {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                   "decode_tok_s_runs": [r["decode_tok_s"] for r in rs],
                   "tokens": rs[0]["tokens"],
                   "same_output": all(r["token_ids"] == reference for r in rs),
                   "acceptance": rs[0]["acceptance"], "accepted_length": rs[0]["accepted_length"]}
            for name, rs in runs.items()}}
        line = ", ".join(f"{n} {e['decode_tok_s']:.1f}" for n, e in out[task]["engines"].items())
        print(f"single {task}: {line} tok/s", flush=True)
    return out


def run_concurrency(manager: Any, names: list[str], tokens: int, levels: list[int], requests: int,
                    repeats: int) -> dict[str, Any]:
    from jupyter_llm.schema import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0)
    prompts = [prompt for _, prompt in TASKS.values()]
    workload = [GenerationRequest(messages=[{"role": "user", "content": prompts[i % len(prompts)]}], params=params)
                for i in range(requests)]
    out: dict[str, Any] = {}
    for level in levels:
        runs: dict[str, list[float]] = {name: [] for name in names}
        accept: dict[str, Any] = {}
        for _ in range(repeats):
            for name in names:
                before = spec_counters(manager, name)
                runs[name].append(closed_loop(manager, name, workload, level))
                accept[name] = acceptance(before, spec_counters(manager, name))
        out[f"c={level}"] = {name: {"output_tok_s": statistics.median(v), "runs": v, "acceptance": accept[name][0]}
                             for name, v in runs.items()}
        line = ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in runs.items())
        print(f"concurrency {level}: {line} tok/s", flush=True)
    return out


def closed_loop(manager: Any, name: str, workload: list[Any], concurrency: int) -> float:
    """Output tokens/s of the workload sent by `concurrency` clients, each sending its next
    request when the previous one finished."""
    async def main() -> float:
        queue = list(workload)
        total = 0

        async def client() -> None:
            nonlocal total
            while queue:
                request = queue.pop()
                async for event in manager.astream([request], backend=name):
                    total += len(event.token_ids)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)

    return manager.submit(main()).result()  # on the manager's loop (works inside a notebook too)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(report: dict[str, Any]) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target, met) rows for the issue's targets."""
    single = report["single"]
    names = report["engines"]
    rows: list[tuple[str, float | None, str, bool | None]] = []

    def median_ratio(engine: str, kind: str) -> float | None:
        values = [ratio(t["engines"][engine]["decode_tok_s"], t["engines"]["plain"]["decode_tok_s"])
                  for t in single.values() if t["kind"] == kind]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    if "ngram" in names:
        grounded = median_ratio("ngram", "grounded")
        same = all(t["engines"]["ngram"]["same_output"] for t in single.values())
        rows.append(("ngram single-stream, grounded tasks (median of tasks)", grounded, ">= 1.8x",
                     None if grounded is None else grounded >= 1.8))
        rows.append(("ngram greedy output identical to plain", float(same), "all", same))
        open_ = median_ratio("ngram", "open")
        rows.append(("ngram single-stream, open-ended", open_, ">= 0.9x", None if open_ is None else open_ >= 0.9))
    if "draft-int8" in names:
        open_ = median_ratio("draft-int8", "open")
        rows.append(("int8 self-draft single-stream, open-ended", open_, "> 1.0x",
                     None if open_ is None else open_ > 1.0))
        grounded = median_ratio("draft-int8", "grounded")
        rows.append(("int8 self-draft single-stream, grounded tasks", grounded, "", None))
        same = all(t["engines"]["draft-int8"]["same_output"] for t in single.values())
        rows.append(("int8 self-draft greedy output identical to plain", float(same), "all", same))
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    names = report["engines"]
    lines = [f"# Speculative decoding benchmark ({report['date']}{', quick' if report['quick'] else ''})", "",
             (f"Embedded SmolLM2-135M-Instruct, native float32, greedy, {report['threads']} threads, "
             f"{report['repeats']} interleaved repeat(s), medians; single-stream outputs up to "
             f"{report['tokens']} tokens. {report['machine']}"), "",
             "## Single stream: decode tokens/s (speed-up over plain; acceptance rate, mean accepted length)", "",
             "| task | kind | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, result in report["single"].items():
        plain = result["engines"]["plain"]["decode_tok_s"]
        cells = []
        for name in names:
            e = result["engines"][name]
            cell = f"{e['decode_tok_s']:.1f}"
            if name != "plain":
                cell += f" ({ratio(e['decode_tok_s'], plain):.2f}x; {fmt(e['acceptance'], 2)}, " \
                        f"{fmt(e['accepted_length'], 2)}){'' if e['same_output'] else ' DIFFERS'}"
            cells.append(cell)
        lines.append(f"| {task} ({result['engines']['plain']['tokens']} tok) | {result['kind']} | "
                     + " | ".join(cells) + " |")
    if report.get("concurrency"):
        lines += ["", (f"## Concurrency: output tokens/s of {report['requests']} requests (all tasks), "
                  f"{report['concurrency_tokens']} tokens each (speed-up over plain)"), "",
                  "| clients | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for level, result in report["concurrency"].items():
            plain = result["plain"]["output_tok_s"]
            cells = [f"{result[n]['output_tok_s']:.1f}" + ("" if n == "plain" else
                                                           f" ({ratio(result[n]['output_tok_s'], plain):.2f}x)")
                     for n in names]
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| what | measured | target | met |", "|---|---:|---:|---|"]
    for what, value, target, met in summary(report):
        shown = ("yes" if value else "no") if target == "all" else (f"{value:.2f}x" if value is not None else "")
        lines.append(f"| {what} | {shown} | {target} | {'' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch  # noqa: F401  (loaded, so that the machine line names its build)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"Machine: {machine_line(machine_info())}, load average at start {load:.1f}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short outputs, one repeat, c=1 and 4 only")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--tokens", type=int, help="max output tokens, single stream (default 160; 48 with --quick)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; 1 with --quick)")
    parser.add_argument("--concurrency", default=None, help="client counts (default 1,4,16; 1,4 with --quick)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--kv-cache-memory", default="512MiB", help="each engine's KV pool")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; accepted: {', '.join(ENGINES)}")
    if names[0] != "plain":
        names = ["plain"] + [n for n in names if n != "plain"]  # the reference for ratios and outputs
    tokens = args.tokens or (48 if args.quick else 160)
    repeats = args.repeats or (1 if args.quick else 3)
    levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,4,16")).split(",")]
    report: dict[str, Any] = {"date": dt.date.today().isoformat(), "quick": args.quick, "engines": names,
                              "threads": args.threads, "repeats": repeats, "tokens": tokens, "machine": machine(),
                              "machine_info": machine_info()}
    manager = load_engines(names, args.threads, args.kv_cache_memory)
    report["single"] = run_single(manager, names, tokens, repeats)
    report["requests"], report["concurrency_tokens"] = 16, tokens // 2
    report["concurrency"] = run_concurrency(manager, names, tokens // 2, levels, 16, repeats)
    text = markdown(report)
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"speculative_bench-{report['date']}{'-quick' if args.quick else ''}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"{stem}.md").write_text(text)
        print(f"saved {args.out / stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
