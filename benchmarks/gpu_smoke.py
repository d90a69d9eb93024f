"""Smoke test of the in-process GPU backends on a machine with an NVIDIA GPU: for each of
vllm and trtllm (when its package is installed), load a model, stream one answer, run a
small batch, cancel a long request, check that seeds reproduce, and print tokens/s.

    python benchmarks/gpu_smoke.py                       # vllm and trtllm, the embedded model
    python benchmarks/gpu_smoke.py --model Qwen/Qwen2.5-0.5B-Instruct --backends vllm
    python benchmarks/gpu_smoke.py --backends llamacpp   # the same checks on CPU (a dry run)

A backend that cannot load here is reported with the reason and skipped. The exit status
is 1 when a backend that loaded failed a check.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

PROMPT = "The capital of France is"


def check(manager: Any, kind: str, model: str | None, max_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    from jupyter_llm import SamplingParams
    from jupyter_llm.backends import backend_class

    ok, reason = backend_class(kind).availability()
    if not ok:
        return {"backend": kind, "result": f"skipped: {reason}"}
    started = time.monotonic()
    info = manager.load(kind, model, name=kind, **options)
    row: dict[str, Any] = {"backend": kind, "model": info.model, "device": info.device,
                           "load s": round(time.monotonic() - started, 1)}
    failures = []
    try:
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        stream = manager.stream(PROMPT, greedy, backend=kind)
        pieces = sum(1 for event in stream if event.token_ids)
        [answer] = stream.completions
        row.update({"ttft ms": round((answer.timings.ttft or 0) * 1000),
                    "decode tok/s": round(answer.timings.decode_tokens_per_s or 0, 1), "streamed events": pieces})
        if answer.completion_tokens != max_tokens or pieces < 2:
            failures.append(f"streamed {pieces} events, {answer.completion_tokens} tokens")

        started = time.monotonic()
        batch = manager.generate([f"{PROMPT} (variant {i})" for i in range(16)], greedy, backend=kind)
        row["batch-16 tok/s"] = round(sum(c.completion_tokens for c in batch) / (time.monotonic() - started), 1)

        long = manager.stream(PROMPT, greedy.replace(max_tokens=4096), backend=kind)
        seen = 0
        for event in long:
            seen += len(event.token_ids)
            if seen >= 5:
                long.cancel()
                break
        deadline = time.monotonic() + 10
        while manager.get(kind).stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        if long.completions[0].finish_reason != "cancelled" or manager.get(kind).stats()["running"]:
            failures.append("cancel did not stop the request")

        seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
        a, b = (manager.generate(PROMPT, seeded, backend=kind)[0].token_ids for _ in range(2))
        if a != b:
            failures.append("the same seed gave different tokens")
        row["answer"] = repr(answer.text[:40])
    finally:
        manager.unload(kind)
    row["result"] = "ok" if not failures else "FAILED: " + "; ".join(failures)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="vllm,trtllm")
    parser.add_argument("--model", help="alias, folder, .gguf or hub id (default: the embedded model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", default="0.5", help="for vllm")
    parser.add_argument("--free-gpu-memory-fraction", default="0.5", help="for trtllm")
    args = parser.parse_args(argv)

    from jupyter_llm import get_manager

    manager = get_manager()
    options = {"vllm": {"gpu_memory_utilization": args.gpu_memory_utilization},
               "trtllm": {"free_gpu_memory_fraction": args.free_gpu_memory_fraction}}
    rows = []
    for kind in args.backends.split(","):
        try:
            rows.append(check(manager, kind, args.model, args.max_tokens, options.get(kind, {})))
        except Exception as error:  # noqa: BLE001 (report any failure and go on with the next backend)
            rows.append({"backend": kind, "result": f"FAILED: {type(error).__name__}: {error}"})
        print(" · ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
    return 1 if any(r["result"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
