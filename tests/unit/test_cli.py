"""`jupyter-llm` in a subprocess: the same library without a notebook."""
import subprocess
import sys

CLI = [sys.executable, "-m", "jupyter_llm.cli"]


def test_generate_streams_to_the_terminal(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "Hello",
                                   "--max-tokens", "6", "--ignore-eos", "--temperature", "1", "--seed", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "6 tokens" in result.stderr and "finish: length" in result.stderr


def test_batch_and_samples_print_each_output(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "a", "b",
                                   "-n", "2", "--max-tokens", "3", "--ignore-eos"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- prompt") == 4 and "4 outputs" in result.stderr


def test_bad_input_is_one_line(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "x",
                                   "--temperature", "-2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("jupyter-llm: error: temperature must be >= 0 (0 = greedy), "
                                                      "got -2.0")


def test_backends_lists_kinds():
    result = subprocess.run(CLI + ["backends"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[0].split()[0] in ("native", "hf")
    assert "hf" in result.stdout
