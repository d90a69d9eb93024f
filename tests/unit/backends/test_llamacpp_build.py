"""The llama.cpp build is chosen from the CPU's flags, never -march=native, never AMX, and its
wheel is cached under a key that only a CPU able to run it computes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jupyter_llm.cpu import CpuInfo, cpu_info, parse_cpuinfo
from jupyter_llm.errors import BuildError
from jupyter_llm.llamacpp_build import choose_build, levels_for, wheel_folder

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni
"""
XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: sse4_2 avx avx2 fma f16c bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni \
avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""


def test_cpuinfo_is_parsed_into_model_and_flags():
    cpu = parse_cpuinfo(XEON, "x86_64")
    assert cpu.model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert cpu.has("avx512_bf16", "amx_tile") and not cpu.has("sve")
    assert "amx_tile" in cpu.isa and "sha_ni" not in cpu.isa
    assert parse_cpuinfo(EPYC, "x86_64").fingerprint != cpu.fingerprint


def test_an_avx2_cpu_gets_an_avx2_build_without_avx512():
    build = choose_build(parse_cpuinfo(EPYC, "x86_64"))
    assert build.tag == "x86_64-avx2"
    args = build.cmake_args
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX_VNNI=OFF" in args


def test_an_amx_cpu_keeps_avx512_kernels_and_never_gets_amx():
    build = choose_build(parse_cpuinfo(XEON, "x86_64"))
    assert build.tag == "x86_64-avx512-vbmi-vnni-bf16-avxvnni"
    args = build.cmake_args
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"} <= set(args)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not any("NATIVE=ON" in a or "ALL_VARIANTS=ON" in a for a in args)


def test_a_lower_level_can_be_asked_for_but_not_a_higher_one():
    xeon, epyc = parse_cpuinfo(XEON, "x86_64"), parse_cpuinfo(EPYC, "x86_64")
    assert levels_for(xeon) == ["avx512", "avx2", "sse42", "generic"]
    assert choose_build(xeon, "avx2").tag == "x86_64-avx2-avxvnni"
    with pytest.raises(BuildError, match="--isa avx512 needs instructions this CPU .AMD EPYC. lacks; it can run: avx2"):
        choose_build(epyc, "avx512")
    assert choose_build(CpuInfo("Neoverse", "aarch64", frozenset({"asimd"}))).cmake_args == [
        "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF"]


def test_wheels_of_two_cpu_levels_never_share_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_LLM_WHEELS", str(tmp_path))
    avx2 = wheel_folder(choose_build(parse_cpuinfo(EPYC, "x86_64")))
    avx512 = wheel_folder(choose_build(parse_cpuinfo(XEON, "x86_64")))
    assert avx2 != avx512 and avx2.parent == avx512.parent == tmp_path
    assert avx2.name.endswith(f"{sys.implementation.cache_tag}-x86_64-avx2")


def test_this_cpu_is_read(tmp_path):
    cpu = cpu_info()
    assert cpu.model and cpu.machine
    assert choose_build(cpu).level in levels_for(cpu)


def test_the_cli_prints_the_build_for_this_cpu():
    done = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "build-llamacpp", "--print"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    tag, args = done.stdout.splitlines()
    assert tag == choose_build(cpu_info()).tag and "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_TILE=OFF" in args


def test_the_installed_build_is_the_one_for_this_cpu():
    """The set-up installed llama-cpp-python through llamacpp_build, for this CPU's level."""
    pytest.importorskip("llama_cpp")
    from jupyter_llm.llamacpp_build import LLAMA_CPP_VERSION, installed_build

    build = choose_build(cpu_info())
    assert installed_build() == {"version": LLAMA_CPP_VERSION, "tag": build.tag, "cmake_args": build.cmake_args}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """ensure() against a private wheel cache and marker, with pip and the compiler recorded, not run."""
    from jupyter_llm import llamacpp_build

    monkeypatch.setenv("JUPYTER_LLM_WHEELS", str(tmp_path / "wheels"))
    monkeypatch.setattr(llamacpp_build, "_marker", lambda: tmp_path / "marker.json")
    calls: list[tuple] = []
    monkeypatch.setattr(llamacpp_build, "_pip", lambda *args, **kw: calls.append(("pip", *args)))

    def fake_build(build, version, quiet=False):
        folder = wheel_folder(build, version)
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / f"llama_cpp_python-{version}-py3-none-linux_x86_64.whl"
        wheel.write_bytes(b"")
        calls.append(("build", build.tag))
        return wheel

    monkeypatch.setattr(llamacpp_build, "build_wheel", fake_build)
    return llamacpp_build, calls


def test_ensure_compiles_once_per_cpu_level_then_reuses_and_then_does_nothing(isolated):
    llamacpp_build, calls = isolated
    tag = choose_build(cpu_info()).tag
    llamacpp_build.ensure()
    assert calls[0] == ("build", tag) and calls[1][:3] == ("pip", "install", "--force-reinstall")
    assert llamacpp_build.installed_build()["tag"] == tag
    calls.clear()
    llamacpp_build.ensure()  # installed and recorded: nothing to do
    assert calls == []
    (llamacpp_build._marker()).unlink()  # e.g. a new venv: the cached wheel is installed, not rebuilt
    llamacpp_build.ensure()
    assert [c[0] for c in calls] == ["pip", "pip"] and calls[0][-1].endswith(".whl")
    calls.clear()
    llamacpp_build.ensure(rebuild=True)
    assert calls[0] == ("build", tag)


def test_ensure_installs_another_wheel_when_the_cpu_changes(isolated, monkeypatch):
    llamacpp_build, calls = isolated
    llamacpp_build.ensure()
    monkeypatch.setattr(llamacpp_build, "cpu_info", lambda: parse_cpuinfo(XEON, "x86_64"))
    calls.clear()
    llamacpp_build.ensure()
    assert calls[0] == ("build", "x86_64-avx512-vbmi-vnni-bf16-avxvnni")
    assert llamacpp_build.installed_build()["tag"] == "x86_64-avx512-vbmi-vnni-bf16-avxvnni"
