"""The probe: a llama.cpp build that cannot run on this CPU is found in a subprocess and turned
into one readable line, before llama.cpp is ever loaded in this process."""
from __future__ import annotations

import pytest

from jupyter_llm.backends import backend_availability
from jupyter_llm.backends.llamacpp import probe as llamacpp_probe
from jupyter_llm.backends.llamacpp.backend import LlamaCppBackend
from jupyter_llm.errors import BackendError
from jupyter_llm.manager import EngineManager

pytest.importorskip("llama_cpp")

DIES_WITH_SIGILL = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


@pytest.fixture
def fresh_verdicts(monkeypatch, tmp_path):
    """A private verdict cache: nothing from earlier runs or tests."""
    monkeypatch.setenv("JUPYTER_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(llamacpp_probe, "_verdicts", {})
    return tmp_path


@pytest.fixture
def crashing_build(fresh_verdicts, monkeypatch):
    monkeypatch.setattr(llamacpp_probe, "PROBE_SCRIPT", DIES_WITH_SIGILL)
    return fresh_verdicts


def test_the_installed_build_evaluates_tokens_here(fresh_verdicts, embedded_model):
    verdict = llamacpp_probe.probe()
    assert verdict.ok, verdict.reason
    assert list((fresh_verdicts / "llamacpp-probe").glob("*.json")), "a definite verdict is cached"


def test_a_build_that_dies_becomes_a_reason_naming_the_signal_and_the_rebuild(crashing_build, embedded_model):
    verdict = llamacpp_probe.probe()
    assert not verdict.ok
    assert "died with SIGILL (illegal instruction)" in verdict.reason
    assert "rebuild it for this CPU: jupyter-llm build-llamacpp --rebuild" in verdict.reason
    assert "\n" not in verdict.reason


def test_the_verdict_is_cached_per_build_and_cpu(crashing_build, embedded_model, monkeypatch):
    first = llamacpp_probe.probe()
    monkeypatch.setattr(llamacpp_probe, "_verdicts", {})  # a new process: only the file is left

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the cached verdict should have been used")

    monkeypatch.setattr(llamacpp_probe.subprocess, "run", no_subprocess)
    assert llamacpp_probe.probe() == first
    # Another build (a rebuild changes the libraries) is asked again.
    monkeypatch.setattr(llamacpp_probe, "build_identity", lambda: "another-build")
    monkeypatch.setattr(llamacpp_probe, "_verdicts", {})
    with pytest.raises(AssertionError, match="cached verdict"):
        llamacpp_probe.probe()


def test_a_timeout_is_reported_and_not_cached(fresh_verdicts, embedded_model, monkeypatch):
    monkeypatch.setattr(llamacpp_probe, "PROBE_SCRIPT", "import time; time.sleep(30)")
    verdict = llamacpp_probe.probe(timeout=0.5)
    assert not verdict.ok and "did not finish in 0.5 s" in verdict.reason
    assert not list(fresh_verdicts.glob("llamacpp-probe/*.json"))


def test_an_error_in_the_probe_is_shown_by_its_last_line(fresh_verdicts, embedded_model, monkeypatch):
    monkeypatch.setattr(llamacpp_probe, "PROBE_SCRIPT", "raise RuntimeError('no such device')")
    verdict = llamacpp_probe.probe()
    assert not verdict.ok and verdict.reason.endswith("RuntimeError: no such device")


def test_the_manager_refuses_to_load_in_one_line(crashing_build, embedded_model):
    m = EngineManager()
    try:
        with pytest.raises(BackendError, match=r"^backend 'llamacpp' cannot load here: this llama-cpp-python build "
                                               r"cannot run on this CPU .*SIGILL"):
            m.load("llamacpp", progress=False)
        assert m.names() == []
    finally:
        m.shutdown()
    ok, reason = backend_availability("llamacpp")
    assert not ok and "SIGILL" in reason
    with pytest.raises(BackendError, match="SIGILL"):  # load() checks too, for direct use
        LlamaCppBackend().load(progress=False)


def test_the_magic_shows_one_line_and_lists_the_backend_as_unavailable(crashing_build, embedded_model, shell, capsys):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="SIGILL .illegal instruction.*jupyter-llm build-llamacpp --rebuild"):
        shell.run_cell("%llm_backend llamacpp")
    shell.run_cell("%llm_backend --list")
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if "llamacpp" in line)
    assert "SIGILL" in row
