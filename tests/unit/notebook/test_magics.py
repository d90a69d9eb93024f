"""The magics in a real InteractiveShell (history off, errors re-raised)."""
import subprocess
import sys

import pytest
from IPython.core.error import UsageError

from jupyter_llm.schema import Completion


def test_load_ext_is_fast_and_imports_no_torch():
    code = ("import time, sys; from IPython.core.interactiveshell import InteractiveShell; "
            "ip = InteractiveShell.instance(); t = time.perf_counter(); ip.run_line_magic('load_ext', 'jupyter_llm'); "
            "dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'transformers' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0 and out[1:] == ["False", "False", "False"]


def test_backend_load_table_use_and_stop(shell, tiny_llama, capsys):
    shell.run_cell(f"%llm_backend hf {tiny_llama} --name m1 --max-num-seqs 4 --threads 1")
    shell.run_cell(f"%llm_backend hf --model {tiny_llama} --name m2")  # --model works as the positional
    loaded = capsys.readouterr().out
    assert "as 'm1' (cpu, float32)" in loaded and "as 'm2'" in loaded
    shell.run_cell("%llm_backend --use m1")
    shell.run_cell("%llm_backend")
    out = capsys.readouterr().out
    assert "default backend: m1" in out and "Loaded backends" in out and "m2" in out
    assert "static" in out and "batch_size=" in out  # batching mode and backend-specific stats
    shell.run_cell("%llm_backend --stop m1")
    shell.run_cell("%llm_backend --stop m2")
    assert "stopped m1" in capsys.readouterr().out


def test_backend_options_both_ways(shell, manager, tiny_llama):
    # --key value (any option the magic does not define) and --backend-option KEY=VALUE, as in the CLI
    shell.run_cell(f"%llm_backend hf {tiny_llama} --name m3 --backend-option max_num_seqs=3 --threads 1 "
                   "--dtype=float32")
    try:
        options = manager.get("m3").options
        assert (options.max_num_seqs, options.threads, options.dtype) == (3, 1, "float32")
    finally:
        shell.run_cell("%llm_backend --stop m3")
    with pytest.raises(UsageError, match=r"unexpected arguments \['--threads', '1'\]; name a backend"):
        shell.run_cell("%llm_backend --threads 1")
    with pytest.raises(UsageError, match="--backend-option expects KEY=VALUE, got 'threads'"):
        shell.run_cell(f"%llm_backend hf {tiny_llama} --backend-option threads")


def test_list_shows_every_backend(shell, capsys):
    shell.run_cell("%llm_backend --list")
    out = capsys.readouterr().out
    assert "hf" in out and "native" in out and "loadable" in out


@pytest.mark.parametrize("line,message", [
    ("%%generate --temperature -1", "temperature must be >= 0"),
    ("%%generate --top-p 2", "top_p must be in (0, 1]"),
    ("%%generate --max-tokens zero", "argument --max-tokens: invalid int value"),
    ("%%generate --backend nope", "no backend named 'nope'"),
    ("%%generate --bogus", "unrecognized arguments: --bogus"),
])
def test_bad_options_are_one_line_usage_errors(shell, tiny_hf, line, message):
    with pytest.raises(UsageError) as info:
        shell.run_cell(f"{line}\nHello")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_backend_options(shell, tiny_llama):
    with pytest.raises(UsageError, match="unknown option.*--colour.*accepted: --device"):
        shell.run_cell(f"%llm_backend hf {tiny_llama} --colour red")
    with pytest.raises(UsageError, match="unknown model"):
        shell.run_cell("%llm_backend hf ./no-such-model")


def test_generate_stores_completions_and_streams_with_provenance(shell, tiny_hf, capsys):
    shell.run_cell("topic = 'France'")
    shell.run_cell("%%generate --backend tiny-hf --max-tokens 5 --temperature 0 -n 2 --seed 1 -o out\n"
                   "About {topic} {unknown} {{x}}\n---\nSecond prompt")
    out = shell.user_ns["out"]
    assert len(out) == 4 and all(isinstance(c, Completion) for c in out)
    assert [(c.prompt_index, c.index) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c.completion_tokens == 5 or c.finish_reason == "stop" for c in out)
    printed = capsys.readouterr().out
    assert "4 outputs" in printed and "TTFT" in printed and "tok/s" in printed


def test_interpolation_sends_braces_right(shell, tiny_hf, monkeypatch):
    sent = {}
    from jupyter_llm.notebook import magics

    def capture(self, prompts, params, backend, chat, system, stream, output, fmt):
        sent.update(prompts=prompts, chat=chat, system=system, params=params)

    monkeypatch.setattr(magics.LLMMagics, "_run_generate", capture)
    shell.run_cell("x = 3")
    shell.run_cell("%%generate\ncode: {'a': {x}} {{x}} {y}")
    assert sent["prompts"] == ["code: {'a': 3} {x} {y}"]
    shell.run_cell("%%generate --no-interpolate\n{x}")
    assert sent["prompts"] == ["{x}"]
    shell.run_cell("history = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},"
                   " {'role': 'user', 'content': 'more'}]")
    shell.run_cell("%%generate --chat\n{history}")
    assert sent["prompts"] == [shell.user_ns["history"]] and sent["chat"]
    shell.run_cell("%%generate --system 'Be brief' --stop '###' --stop END\nHi")
    assert sent["chat"] and sent["system"] == "Be brief" and sent["params"].stop == ("###", "END")
    shell.run_cell("%%generate --stop '\\n\\n' 'a\\tb'\nHi")
    assert sent["params"].stop == ("\n\n", "a\tb")


def test_config_defaults(shell, tiny_hf, monkeypatch):
    from jupyter_llm.notebook import magics

    sent = {}
    monkeypatch.setattr(magics.LLMMagics, "_run_generate",
                        lambda self, prompts, params, backend, chat, system, stream, output, fmt:
                        sent.update(params=params, stream=stream, chat=chat, backend=backend))
    shell.run_cell("%config LLMMagics.max_tokens = 33")
    shell.run_cell("%config LLMMagics.temperature = 0.0")
    shell.run_cell("%config LLMMagics.stream = False")
    shell.run_cell("%config LLMMagics.chat = True")
    shell.run_cell("%config LLMMagics.default_backend = 'tiny-hf'")
    shell.run_cell("%%generate\nHi")
    assert sent == {"params": sent["params"], "stream": False, "chat": True, "backend": "tiny-hf"}
    assert sent["params"].max_tokens == 33 and sent["params"].temperature == 0.0
    shell.run_cell("%%generate --max-tokens 4 --temperature 0.5\nHi")
    assert sent["params"].max_tokens == 4 and sent["params"].temperature == 0.5


def test_every_sampling_option_reaches_the_params(shell, tiny_hf, monkeypatch):
    from jupyter_llm.notebook import magics

    sent = {}
    monkeypatch.setattr(magics.LLMMagics, "_run_generate",
                        lambda self, prompts, params, *a, **k: sent.update(params=params))
    shell.run_cell("%%generate --max-tokens 9 --temperature 0.3 --top-p 0.9 --top-k 7 --min-p 0.05 "
                   "--repetition-penalty 1.1 --presence-penalty 0.2 --frequency-penalty 0.3 --seed 5 "
                   "--stop a b -n 2 --logprobs 3 --ignore-eos\nHi")
    p = sent["params"]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.seed, p.stop, p.n, p.logprobs, p.ignore_eos) == (
        9, 0.3, 0.9, 7, 0.05, 1.1, 0.2, 0.3, 5, ("a", "b"), 2, 3, True)


def test_no_stream_logprobs_and_errors_from_the_backend(shell, manager, tiny_hf, capsys):
    shell.run_cell("%%generate --backend tiny-hf --no-stream --max-tokens 3 --logprobs 2 --temperature 0 -o r\nHi")
    assert len(shell.user_ns["r"][0].logprobs) == shell.user_ns["r"][0].completion_tokens
    assert "logprobs" in capsys.readouterr().out
    engine = manager.get(tiny_hf).engine
    original = engine.step
    engine.step = lambda: (_ for _ in ()).throw(RuntimeError("engine exploded"))
    try:
        shell.run_cell("%%generate --backend tiny-hf --max-tokens 3\nHi")
    finally:
        engine.step = original
        engine.rows, engine.removed = [], set()
    assert "error from backend 'hf': RuntimeError: engine exploded" in capsys.readouterr().out
    shell.run_cell("%%generate --backend tiny-hf --max-tokens 2 --ignore-eos -o r2\nHi")
    assert shell.user_ns["r2"][0].completion_tokens == 2


def test_empty_cell_is_a_usage_error(shell, tiny_hf):
    with pytest.raises(UsageError, match="the cell is empty"):
        shell.run_cell("%%generate\n\n---\n")
