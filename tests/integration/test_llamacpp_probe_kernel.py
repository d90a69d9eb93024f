"""In a real kernel: a llama.cpp build that dies on this CPU (simulated: the probe's subprocess
kills itself with SIGILL) is refused in one line, llama.cpp is never loaded in the kernel, and
the kernel lives on; with the real probe the same kernel then loads llama.cpp and generates."""
from __future__ import annotations

import pytest

from kernel_helpers import Kernel

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def kernel(embedded_model, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    k = Kernel()
    k.run("%load_ext jupyter_llm")
    yield k, tmp_path_factory.mktemp("verdicts")
    k.shutdown()


def test_a_build_that_cannot_run_here_is_one_line_and_the_kernel_lives(kernel):
    k, verdicts = kernel
    setup = k.run(f"""
import os, jupyter_llm.backends.llamacpp.probe as probe
real_script = probe.PROBE_SCRIPT
os.environ["JUPYTER_LLM_CACHE"] = {str(verdicts / "crash")!r}
probe.PROBE_SCRIPT = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
""")
    assert not setup.errors, setup.text
    result = k.run("%llm_backend llamacpp")
    assert result.reply["status"] == "error" and result.reply["ename"] == "UsageError"
    assert result.reply["traceback"] == []
    [line] = result.text.strip().splitlines()
    assert line.startswith("UsageError: backend 'llamacpp' cannot load here: this llama-cpp-python build cannot "
                           "run on this CPU")
    assert "SIGILL (illegal instruction)" in line and line.endswith("jupyter-llm build-llamacpp --rebuild")
    alive = k.run("import sys; print(1 + 1, 'llama_cpp' in sys.modules)")
    assert alive.text.strip() == "2 False", "the kernel lives and never loaded llama.cpp"

    # The real probe (a new verdict cache) passes on this machine's build, and the same kernel generates.
    k.run(f"probe.PROBE_SCRIPT = real_script; probe._verdicts.clear(); "
          f"os.environ['JUPYTER_LLM_CACHE'] = {str(verdicts / 'real')!r}")
    loaded = k.run("%llm_backend llamacpp --n-threads 2")
    assert "loaded" in loaded.text and not loaded.errors, loaded.text
    answer = k.run("%%generate --temperature 0 --max-tokens 8\nThe capital of France is")
    assert "Paris" in answer.text and not answer.errors, answer.text
