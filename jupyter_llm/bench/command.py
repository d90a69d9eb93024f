"""`%llm_bench` and `jupyter-llm bench`: one set of options, one function that runs them."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jupyter_llm.argtable import ArgTable
from jupyter_llm.bench.result import BenchResult
from jupyter_llm.bench.targets import BackendTarget, HTTPTarget, Target
from jupyter_llm.bench.workload import Workload, from_file, from_prompts, parse_length, synthetic
from jupyter_llm.errors import ParamError

BENCH = ArgTable([
    (("--backends",), {"help": "loaded backends, comma-separated (default: the default backend)"}),
    (("--url",), {"action": "append", "metavar": "[LABEL=]URL",
                  "help": "OpenAI-compatible base URL, optionally labelled (repeatable)"}),
    (("--api-key",), {"help": "API key for --url targets (default: $OPENAI_API_KEY)"}),
    (("--model",), {"help": "model name for --url targets (default: the server's first model)"}),
    (("--num-prompts",), {"type": int, "default": 32}),
    (("--prompt-len",), {"default": "64", "help": "tokens per synthetic prompt: N or A-B"}),
    (("--max-tokens",), {"default": "64", "help": "output tokens: N or A-B (enforced with ignore_eos)"}),
    (("--seed",), {"type": int, "default": 0}),
    (("--prompts",), {"metavar": "VAR", "help": "a list of prompts (notebook variable)"}),
    (("--file",), {"help": "prompts from a .txt (one per line) or .jsonl file"}),
    (("--chat",), {"action": "store_true", "help": "send as chat messages"}),
    (("--no-ignore-eos",), {"action": "store_true", "help": "let outputs end at end-of-sequence"}),
    (("--concurrency",), {"default": "1,4", "help": "closed-loop levels, comma-separated"}),
    (("--request-rate",), {"type": float, "help": "open loop: Poisson arrivals per second (instead of --concurrency)"}),
    (("--repeat",), {"type": int, "default": 1, "help": "repeat the sweep; medians are reported"}),
    (("--warmup",), {"type": int, "default": 1, "help": "requests per target before measuring"}),
    (("--compare",), {"metavar": "FILE", "help": "overlay an earlier saved run (JSON)"}),
    (("--save",), {"metavar": "FILE", "help": "save the result as JSON (and FILE.png with the charts)"}),
    (("--no-plot",), {"action": "store_true", "help": "table only"}),
])


def _concurrency(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ParamError(f"--concurrency takes positive integers separated by commas (e.g. 1,4,16), got {text!r}")
    return levels


def build_workload(args: Any, namespace: Mapping[str, Any] | None = None) -> Workload:
    max_tokens = parse_length(args.max_tokens)
    ignore_eos = not args.no_ignore_eos
    if args.prompts:
        if namespace is None or args.prompts not in namespace:
            raise ParamError(f"--prompts names a variable that does not exist: {args.prompts!r}")
        prompts = namespace[args.prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ParamError(f"--prompts {args.prompts} must be a list of strings, got {type(prompts).__name__}")
        return from_prompts(list(prompts), max_tokens, args.seed, args.chat, ignore_eos)
    if args.file:
        return from_file(args.file, max_tokens, args.seed, args.chat, ignore_eos)
    return synthetic(args.num_prompts, parse_length(args.prompt_len), max_tokens, args.seed, args.chat, ignore_eos)


def build_targets(args: Any, manager: Any) -> list[Target]:
    targets: list[Target] = []
    names = [n.strip() for n in (args.backends or "").split(",") if n.strip()]
    if not names and not args.url:
        names = [manager.resolve_name(None)]
    targets += [BackendTarget(manager, name) for name in names]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    for spec in args.url or []:
        label, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
        targets.append(HTTPTarget(url, api_key, args.model, label=label or None))
    return targets


def run_from_args(args: Any, manager: Any, namespace: Mapping[str, Any] | None = None,
                  progress: bool = True) -> tuple[BenchResult, BenchResult | None]:
    """Run the benchmark that the options describe; returns (result, the --compare run or None)."""
    from jupyter_llm.bench.measure import run_benchmark

    if args.repeat < 1 or args.warmup < 0:
        raise ParamError("--repeat must be >= 1 and --warmup >= 0")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ParamError(f"--request-rate must be > 0, got {args.request_rate}")
    compare = BenchResult.load(args.compare) if args.compare else None
    workload = build_workload(args, namespace)
    levels = _concurrency(args.concurrency)
    targets = build_targets(args, manager)
    result = run_benchmark(targets, workload, levels, args.request_rate, args.repeat, min(args.warmup, len(workload)),
                           progress)
    if args.save:
        path = result.save(args.save)
        if not args.no_plot:
            from jupyter_llm.bench.charts import figure_png

            path.with_suffix(".png").write_bytes(figure_png(result.plot(compare)))
    return result, compare
