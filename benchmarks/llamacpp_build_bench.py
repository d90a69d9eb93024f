"""What the portable llama.cpp build costs against a -march=native one, on this CPU.

The set-up compiles llama-cpp-python with the instruction sets spelled out (jupyter_llm/
llamacpp_build.py). This compiles a second, GGML_NATIVE=ON wheel of the same version (kept
in the wheel cache under "native-bench", never installed) and times both on the embedded
GGUF in fresh subprocesses, interleaved (A B, B A, ...): prompt evaluation (tokens/s over a
256-token prompt in one batch) and decode (one token per forward, 128 forwards), medians.

    python benchmarks/llamacpp_build_bench.py --repeats 5
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from jupyter_llm.bench.machine import machine_info, machine_line
from jupyter_llm.llamacpp_build import LLAMA_CPP_VERSION, installed_build, wheel_cache

# Timed in a subprocess: argv = model, threads. Prints {"prompt_tps", "decode_tps"}.
TIMING = r"""
import json, sys, time
import llama_cpp
model, threads = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
text = ("The history of the steam engine begins with simple devices that used heat to move water. " * 40).encode()
ids = llm.tokenize(text)
prompt, decode = ids[:256], ids[256:384]
llm.eval(prompt[:8]); llm.reset()  # warm-up
start = time.perf_counter(); llm.eval(prompt); prompt_s = time.perf_counter() - start
start = time.perf_counter()
for token in decode:
    llm.eval([token])
decode_s = time.perf_counter() - start
print(json.dumps({"prompt_tps": len(prompt) / prompt_s, "decode_tps": len(decode) / decode_s,
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def native_wheel(rebuild: bool) -> Path:
    folder = wheel_cache() / f"native-bench-llama-cpp-python-{LLAMA_CPP_VERSION}-{sys.implementation.cache_tag}"
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels and not rebuild:
        return wheels[-1]
    print(f"compiling llama-cpp-python {LLAMA_CPP_VERSION} with GGML_NATIVE=ON (about 5 minutes)", flush=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary",
                    ":all:", "-w", str(folder), f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env, check=True)
    return max(folder.glob("llama_cpp_python-*.whl"))


def time_build(site: str | None, model: str, threads: int) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", TIMING, model, str(threads)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"timing failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from jupyter_llm.model_files import embedded_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rebuild", action="store_true", help="compile the native wheel again")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    model = str(embedded_gguf_path())
    portable = (installed_build() or {}).get("tag") or "installed (not built by jupyter-llm)"
    with tempfile.TemporaryDirectory() as scratch:
        zipfile.ZipFile(native_wheel(args.rebuild)).extractall(scratch)
        for lib in Path(scratch).rglob("*.so*"):
            lib.chmod(0o755)
        builds = {f"portable ({portable})": None, "native (-march=native)": scratch}
        runs: dict[str, list[dict]] = {name: [] for name in builds}
        for repeat in range(args.repeats):
            pairs = list(builds.items())
            for name, site in pairs if repeat % 2 == 0 else pairs[::-1]:  # interleaved: A B, B A, A B ...
                runs[name].append(time_build(site, model, args.threads))
                print(f"repeat {repeat + 1}/{args.repeats} {name}: decode {runs[name][-1]['decode_tps']:.1f} tok/s, "
                      f"prompt {runs[name][-1]['prompt_tps']:.0f} tok/s", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in ("prompt_tps", "decode_tps")}
               for name, rs in runs.items()}
    (p_name, p), (n_name, n) = medians.items()
    # Each repeat's two runs sat side by side: the median of their ratios is the steadier figure.
    paired = {k: statistics.median(a[k] / b[k] for a, b in zip(runs[p_name], runs[n_name]))
              for k in ("prompt_tps", "decode_tps")}
    info = machine_info()
    lines = [f"# llama.cpp build cost {dt.date.today().isoformat()}", "",
             (f"Machine: {machine_line(info)}. llama-cpp-python {LLAMA_CPP_VERSION}, embedded SmolLM2-135M Q4_1, "
              f"{args.threads} threads, median of {args.repeats} interleaved runs, each in a fresh process."), "",
             "| build | prompt eval tok/s (256 tokens) | decode tok/s (128 forwards) |", "|---|---:|---:|",
             *(f"| {name} | {m['prompt_tps']:.0f} | {m['decode_tps']:.1f} |" for name, m in medians.items()),
             (f"| portable / native (ratio of medians) | {p['prompt_tps'] / n['prompt_tps']:.3f} | "
              f"{p['decode_tps'] / n['decode_tps']:.3f} |"),
             (f"| portable / native (median of paired ratios) | {paired['prompt_tps']:.3f} | "
              f"{paired['decode_tps']:.3f} |"),
             "", f"llama.cpp system info, portable: `{runs[p_name][0]['system_info'].strip()}`",
             f"llama.cpp system info, native: `{runs[n_name][0]['system_info'].strip()}`", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"llamacpp_build_bench-{dt.date.today().isoformat()}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "threads": args.threads, "runs": runs,
                                                     "medians": medians, "paired_ratios": paired}, indent=1))
    print(f"saved {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
