"""What this CPU is and which instruction sets it offers, read from /proc/cpuinfo.

Benchmarks record it with every result (figures from two CPUs are never put in one ratio),
and the llama.cpp build picks its instruction sets from it (`llamacpp_build`). Standard
library only: the set-up runs it before anything else is installed.
"""
from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass

# The flags that decide which kernels llama.cpp and torch run, under /proc/cpuinfo's names.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni",
             "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    machine: str  # platform.machine(): "x86_64", "aarch64"
    flags: frozenset[str]

    def has(self, *names: str) -> bool:
        return all(name in self.flags for name in names)

    @property
    def isa(self) -> list[str]:
        """The instruction-set flags of ISA_FLAGS that this CPU advertises, in that order."""
        return [name for name in ISA_FLAGS if name in self.flags]

    @property
    def fingerprint(self) -> str:
        """Short digest of model, machine and every flag: equal only on CPUs that run the same code."""
        text = "\n".join([self.model, self.machine, *sorted(self.flags)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """'AMD EPYC (x86_64; avx2 fma f16c ...)' for tables and notes."""
        return f"{self.model} ({self.machine}; {' '.join(self.isa) or 'no SIMD flags read'})"


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (the first processor's block is enough)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 says flags, arm64 Features
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or machine, machine, flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while a process runs)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())


if __name__ == "__main__":
    print(cpu_info().summary())
