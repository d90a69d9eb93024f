"""Build llama-cpp-python for this CPU's instruction sets, on purpose, never `-march=native`.

llama.cpp's default build (GGML_NATIVE=ON) compiles for whatever the build machine's CPU
advertises, AMX included; on VMs that advertise AMX but trap on its instructions, that
binary dies with SIGILL, and a wheel pip cached on one machine runs on the next CPU too.
Instead this picks one of a few levels from the CPU's flags and spells out every
instruction-set option:

    avx512   AVX-512 F/CD/VL/DQ/BW, plus VBMI, VNNI, BF16 and AVX-VNNI where present
    avx2     AVX, AVX2, FMA, F16C, BMI2, plus AVX-VNNI where present
    sse42    SSE 4.2 only
    generic  no SIMD options (non-x86 machines: the compiler's baseline)

AMX is always off. The wheel is built with pip's cache off and kept in a folder of our
cache named by version, Python ABI and that tag ("x86_64-avx512-vbmi-vnni-bf16"): a CPU
only ever reuses a wheel whose tag it computes itself, so a wheel never lands on a CPU
that lacks what it was compiled for.

    python -m jupyter_llm.llamacpp_build            # what scripts/setup.sh runs
    jupyter-llm build-llamacpp --isa avx2 --rebuild  # a safer build, compiled again

Standard library only: the set-up runs it before the package's dependencies exist.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from jupyter_llm.cpu import CpuInfo, cpu_info
from jupyter_llm.errors import BuildError

LLAMA_CPP_VERSION = "0.3.36"
REBUILD_COMMAND = "jupyter-llm build-llamacpp --rebuild"

_AVX2_OPTIONS = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")
_AVX2_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
# level -> (flags the CPU must have, the ggml options it turns on, {optional flag: ggml option}); best first.
# Every option not turned on is spelled out as OFF.
_X86_LEVELS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]] = {
    "avx512": (_AVX2_FLAGS + ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
               _AVX2_OPTIONS + ("GGML_AVX512",),
               {"avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}),
    "avx2": (_AVX2_FLAGS, _AVX2_OPTIONS, {"avx_vnni": "GGML_AVX_VNNI"}),
    "sse42": (("sse4_2",), ("GGML_SSE42",), {}),
    "generic": ((), (), {}),
}
_ALL_OPTIONS = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX_VNNI",
                "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
                # AMX: advertised but trapping (SIGILL at tilezero) on some VMs; its kernels only
                # help large prompt batches, so no build of ours has them.
                "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
_SHORT = {"GGML_AVX512_VBMI": "vbmi", "GGML_AVX512_VNNI": "vnni", "GGML_AVX512_BF16": "bf16",
          "GGML_AVX_VNNI": "avxvnni"}



@dataclass(frozen=True)
class LlamaCppBuild:
    machine: str
    level: str  # a key of _X86_LEVELS
    extras: tuple[str, ...]  # the optional ggml options turned on

    @property
    def tag(self) -> str:
        return "-".join([self.machine, self.level, *(_SHORT[o] for o in self.extras)])

    @property
    def cmake_args(self) -> list[str]:
        on = set(_X86_LEVELS[self.level][1]) | set(self.extras)
        args = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF"]
        if self.machine in ("x86_64", "AMD64", "i686"):
            args += [f"-D{option}={'ON' if option in on else 'OFF'}" for option in _ALL_OPTIONS]
        return args


def levels_for(cpu: CpuInfo) -> list[str]:
    """The levels this CPU can run, best first."""
    if cpu.machine not in ("x86_64", "AMD64", "i686"):
        return ["generic"]
    return [level for level, (required, _, _) in _X86_LEVELS.items() if cpu.has(*required)]


def choose_build(cpu: CpuInfo, level: str | None = None) -> LlamaCppBuild:
    """The best build for `cpu`, or the given level if the CPU can run it."""
    possible = levels_for(cpu)
    if level is None:
        level = possible[0]
    elif level not in possible:
        raise BuildError(f"--isa {level} needs instructions this CPU ({cpu.model}) lacks; "
                         f"it can run: {', '.join(possible)}")
    extras = _X86_LEVELS[level][2]
    return LlamaCppBuild(cpu.machine, level, tuple(opt for flag, opt in extras.items() if cpu.has(flag)))


def wheel_cache() -> Path:
    """Our own wheel cache (pip's cache is keyed by the sdist, not by CPU, so it is never used)."""
    base = os.environ.get("JUPYTER_LLM_WHEELS")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jupyter_llm" / "wheels"


def wheel_folder(build: LlamaCppBuild, version: str = LLAMA_CPP_VERSION) -> Path:
    return wheel_cache() / f"llama-cpp-python-{version}-{sys.implementation.cache_tag}-{build.tag}"


def _marker() -> Path:
    return Path(sys.prefix) / "jupyter-llm-llamacpp.json"


def installed_build() -> dict | None:
    """What `ensure` last installed into this environment: {"version", "tag", "cmake_args"}, or None."""
    try:
        return json.loads(_marker().read_text())
    except (OSError, ValueError):
        return None


def _pip(*args: str, env: dict | None = None, quiet: bool = False) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *(["-q"] if quiet else []), *args]
    if subprocess.run(command, env=env, check=False).returncode != 0:
        raise BuildError(f"failed: {' '.join(command)}")


def build_wheel(build: LlamaCppBuild, version: str = LLAMA_CPP_VERSION, quiet: bool = False) -> Path:
    """Compile llama-cpp-python `version` for `build` into its wheel folder (about 5 minutes on 2 cores)."""
    folder = wheel_folder(build, version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        # The sdist comes through pip's HTTP cache; the wheel built from it bypasses pip's wheel cache.
        _pip("download", "--no-deps", "--no-binary", ":all:", "-d", scratch, f"llama-cpp-python=={version}",
             quiet=quiet)
        sdist = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        env = {**os.environ, "CMAKE_ARGS": " ".join(build.cmake_args),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        print(f"llamacpp_build: compiling llama-cpp-python {version} for {build.tag} "
              f"({' '.join(build.cmake_args)})", file=sys.stderr)
        _pip("wheel", "--no-deps", "--no-cache-dir", "-w", str(Path(scratch) / "wheel"), str(sdist),
             env=env, quiet=quiet)
        staged = Path(scratch) / "staged"
        (Path(scratch) / "wheel").rename(staged)
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)  # atomic: a half-built folder is never taken for a wheel
    return _wheel_in(folder)


def _wheel_in(folder: Path) -> Path:
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise BuildError(f"no llama-cpp-python wheel in {folder}")
    return wheels[-1]


def ensure(level: str | None = None, version: str = LLAMA_CPP_VERSION, rebuild: bool = False,
           quiet: bool = False) -> LlamaCppBuild:
    """Install the llama-cpp-python build for this CPU into this environment, compiling it only
    when our cache has no wheel for it (or `rebuild`). Seconds when it is already installed."""
    build = choose_build(cpu_info(), level)
    wanted = {"version": version, "tag": build.tag, "cmake_args": build.cmake_args}
    if not rebuild and installed_build() == wanted and find_spec("llama_cpp") is not None:
        return build
    folder = wheel_folder(build, version)
    wheel = build_wheel(build, version, quiet) if rebuild or not folder.is_dir() else _wheel_in(folder)
    _pip("install", "--force-reinstall", "--no-deps", str(wheel), quiet=quiet)
    _pip("install", str(wheel), quiet=quiet)  # its dependencies, if any are missing
    _marker().write_text(json.dumps(wanted))
    # A new build invalidates the probe's verdict by itself: the verdict is keyed by the library files.
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jupyter-llm build-llamacpp", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isa", choices=list(_X86_LEVELS), help="instruction-set level (default: the best "
                        "this CPU runs)")
    parser.add_argument("--version", default=LLAMA_CPP_VERSION, help="llama-cpp-python version")
    parser.add_argument("--rebuild", action="store_true", help="compile again even if a wheel is cached")
    parser.add_argument("--print", action="store_true", help="only print the build tag and CMake arguments")
    parser.add_argument("--quiet", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        if args.print:
            build = choose_build(cpu_info(), args.isa)
            print(build.tag)
            print(" ".join(build.cmake_args))
            return 0
        build = ensure(args.isa, args.version, args.rebuild, args.quiet)
    except BuildError as error:
        print(f"build-llamacpp: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"llama-cpp-python {args.version} for {build.tag} is installed ({cpu_info().model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
