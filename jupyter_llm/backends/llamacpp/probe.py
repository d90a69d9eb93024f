"""Can the installed llama.cpp build evaluate a token on this CPU? Asked in a subprocess.

A llama-cpp-python build compiled for instructions this CPU lacks (or advertises but traps
on, as AMX does on some VMs) dies with SIGILL in its first matrix multiply, and in a kernel
that is a dead kernel. So before llama.cpp is loaded in this process, a short subprocess
loads a small GGUF (the embedded SmolLM2 when installed) and evaluates a few tokens. The
verdict is cached on disk per build (the library files' names, sizes and times) and CPU
(`CpuInfo.fingerprint`): a rebuild or another CPU asks again, nothing else does.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from jupyter_llm.cpu import cpu_info
from jupyter_llm.llamacpp_build import REBUILD_COMMAND, installed_build
from jupyter_llm.model_files import cache_dir, embedded_gguf_path

PROBE_TIMEOUT_S = 120.0
# Run as `python -c PROBE_SCRIPT MODEL.gguf`; prints "ok" when a forward pass completed.
PROBE_SCRIPT = """
import sys
import llama_cpp
llama = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_batch=8, n_threads=2, verbose=False)
llama.eval(llama.tokenize(b"The capital of France is"))
print("ok")
"""


@dataclass(frozen=True)
class ProbeVerdict:
    ok: bool
    reason: str = ""  # one line, when not ok


_verdicts: dict[str, ProbeVerdict] = {}  # this process's, by cache key


def build_identity() -> str | None:
    """A digest of the installed llama_cpp's shared libraries, or None when it is not installed."""
    spec = find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in package.rglob("*") if p.suffix == ".so" or ".so." in p.name)
    text = "\n".join(f"{p.relative_to(package)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _verdict_file(key: str) -> Path:
    return cache_dir() / "llamacpp-probe" / f"{key}.json"


def _signal_name(returncode: int) -> str:
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
    return f"{name} ({(signal.strsignal(-returncode) or name).lower()})"


def _run_probe(model_path: str, timeout: float) -> tuple[ProbeVerdict, bool]:
    """(verdict, whether it is worth caching): a crash or a success is; a timeout is not."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, model_path], check=False, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeVerdict(False, f"llama.cpp's test evaluation on this CPU did not finish in {timeout:g} s "
                                   f"(a busy machine? try again)"), False
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return ProbeVerdict(True), True
    cpu = cpu_info().model
    build = (installed_build() or {}).get("tag", "not built by jupyter-llm")
    if done.returncode < 0:
        return ProbeVerdict(False, f"this llama-cpp-python build cannot run on this CPU ({cpu}): a test evaluation "
                                   f"in a subprocess died with {_signal_name(done.returncode)} (build: {build}); "
                                   f"rebuild it for this CPU: {REBUILD_COMMAND}"), True
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return ProbeVerdict(False, f"llama.cpp's test evaluation failed on this CPU ({cpu}): {last}"), False


def probe(model_path: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> ProbeVerdict:
    """Whether the installed llama.cpp evaluates tokens here. `model_path` is used only when the
    embedded model is not installed; with neither, or no llama_cpp, there is nothing to ask (ok)."""
    build = build_identity()
    gguf = embedded_gguf_path() or model_path
    if build is None or gguf is None:
        return ProbeVerdict(True)
    key = f"{build}-{cpu_info().fingerprint}"
    if key in _verdicts:
        return _verdicts[key]
    path = _verdict_file(key)
    try:
        verdict = ProbeVerdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        verdict, keep = _run_probe(str(gguf), timeout)
        if not keep:
            return verdict  # inconclusive: ask again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(verdict)))
    _verdicts[key] = verdict
    return verdict
