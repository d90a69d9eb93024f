"""Two checkouts of this repository side by side: `engine_bench.py` of each, run in turn
(A B A B ...), each run in a fresh process that imports its own checkout's `jupyter_llm`.
Reports each metric's median per checkout and the median of the paired B/A ratios, which is
what a refactor or an optimisation must show on these shared, noisy machines.

    git worktree add /tmp/before <commit>
    python benchmarks/checkout_ab.py /tmp/before . --rounds 4 -- --engines native-fp32 --scenarios single,batch

Everything after `--` goes to both `engine_bench.py` runs (`--no-memory --no-save --quiet` are added: results
come back as JSON through a temporary folder). Saved as benchmarks/results/checkout_ab-<date>[-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jupyter_llm.bench.machine import machine_info, machine_line


def git_label(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip()[:72] or str(checkout)


def one_run(checkout: Path, bench_args: list[str]) -> dict[str, dict[str, float]]:
    """One engine_bench run of `checkout`: engine -> metric -> value."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(checkout / "benchmarks" / "engine_bench.py"), *bench_args, "--no-memory",
                   "--quiet", "--out", out, "--tag", "ab"]
        subprocess.run(command, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
        report = json.loads(next(Path(out).glob("engine_bench-*.json")).read_text())
    return report["summary"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="the reference checkout (e.g. a worktree of the commit before)")
    parser.add_argument("b", type=Path, help="the checkout measured against it")
    parser.add_argument("--rounds", type=int, default=4, help="A B pairs (default 4)")
    parser.add_argument("--tag", help="a word added to the saved files' names")
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"a": [], "b": []}
    for i in range(args.rounds):
        # Alternate which side goes first, so that a slow spell of the machine hits both.
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in order:
            runs[side].append(one_run(getattr(args, side).resolve(), bench_args))
            print(f"round {i + 1}/{args.rounds} {side} done", file=sys.stderr, flush=True)
    rows = []
    for engine in runs["a"][0]:
        for metric in runs["a"][0][engine]:
            a = [r[engine][metric] for r in runs["a"]]
            b = [r[engine][metric] for r in runs["b"]]
            paired = statistics.median(y / x for x, y in zip(a, b, strict=True) if x)
            rows.append({"engine": engine, "metric": metric, "a_median": statistics.median(a),
                         "b_median": statistics.median(b), "paired_ratio_b_over_a": paired, "a": a, "b": b})
    labels = {"a": git_label(args.a), "b": git_label(args.b)}
    info = machine_info()
    lines = [f"# Checkout A/B {dt.date.today().isoformat()}", "",
             (f"Machine: {machine_line(info)}. engine_bench.py {' '.join(bench_args)}; {args.rounds} rounds, "
             "A and B alternating, each run a fresh process."), "",
             f"- A: {labels['a']}", f"- B: {labels['b']}", "",
             "| engine | metric | A median | B median | B/A (median of paired ratios) |", "|---|---|---:|---:|---:|",
             *(f"| {r['engine']} | {r['metric']} | {r['a_median']:.2f} | {r['b_median']:.2f} | "
               f"{r['paired_ratio_b_over_a']:.3f} |" for r in rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "-".join(["checkout_ab", dt.date.today().isoformat()] + [args.tag] * bool(args.tag))
    stem.with_suffix(".json").write_text(json.dumps({"labels": labels, "bench_args": bench_args, "machine": info,
                                                     "rows": rows}, indent=2, default=str))
    stem.with_suffix(".md").write_text(text)
    print(f"saved {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
