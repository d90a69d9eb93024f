"""`jupyter-llm` in a subprocess: the same library without a notebook."""
import subprocess
import sys

import pytest

from jupyter_llm.argtable import backend_options
from jupyter_llm.cli import main, parse
from jupyter_llm.errors import ParamError

CLI = [sys.executable, "-m", "jupyter_llm.cli"]


def test_generate_streams_to_the_terminal(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "Hello",
                                   "--max-tokens", "6", "--ignore-eos", "--temperature", "1", "--seed", "3"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "6 tokens" in result.stderr and "finish: length" in result.stderr


def test_batch_and_samples_print_each_output(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "a", "b",
                                   "-n", "2", "--max-tokens", "3", "--ignore-eos"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- prompt") == 4 and "4 outputs" in result.stderr


def test_bad_input_is_one_line(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "x",
                                   "--temperature", "-2"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("jupyter-llm: error: temperature must be >= 0 (0 = greedy), "
                                                      "got -2.0")


def test_backends_lists_kinds():
    result = subprocess.run(CLI + ["backends"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[0].split()[0] in ("native", "hf")
    assert "hf" in result.stdout


def test_backend_options_reach_the_backend(tiny_llama):
    # a free --key value word and a --backend-option item, both real hf options
    ok = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "Hello",
                               "--max-num-seqs", "1", "--backend-option", "dtype=float32", "--threads", "1",
                               "--max-tokens", "3", "--ignore-eos"],
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "3 tokens" in ok.stderr
    bad = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "--colour", "red", "Hi"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("jupyter-llm: error: unknown option(s) --colour for "
                                                          "backend 'hf'; accepted: --device")


def test_bench_loads_with_backend_options(tiny_llama):
    result = subprocess.run(CLI + ["bench", "--load", "hf", "--load-model", str(tiny_llama), "--num-prompts", "2",
                                   "--prompt-len", "4", "--max-tokens", "2", "--concurrency", "1", "--warmup", "0",
                                   "--no-plot", "--max-num-seqs", "1", "--backend-option", "threads=1"],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert "output_throughput" in result.stdout
    stray = subprocess.run(CLI + ["bench", "--url", "http://127.0.0.1:9/v1", "--threads", "1"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert stray.returncode == 2 and "add --load KINDS" in stray.stderr


class Recorder:
    """Stands in for the manager: records what the CLI loads, then stops it with a user error."""

    def __init__(self):
        self.loads = []

    def load(self, kind, model=None, name=None, progress=True, **options):
        self.loads.append((kind, model, options))
        raise ParamError("recorded")

    def load_default(self, progress=True, **options):
        return self.load("default", None, **options)


@pytest.mark.parametrize("argv,expected", [
    (["generate", "--device", "cpu", "Hello", "--threads", "1"], ("default", None, {"device": "cpu", "threads": 1})),
    (["generate", "a", "b", "--backend", "native", "--kv-cache-memory=4MiB", "--no-prefix-cache"],
     ("native", None, {"kv_cache_memory": "4MiB", "prefix_cache": False})),
    (["serve", "--backend", "openai", "--api-key", "server-key", "--backend-option", "api_key=sk-up",
      "--url", "http://up:8000/v1", "--max-num-seqs", "8"],
     ("openai", None, {"api_key": "sk-up", "url": "http://up:8000/v1", "max_num_seqs": "8"})),
    (["serve", "--max-queue", "4", "--backend-option", "max_num_seqs=64", "--threads", "2"],
     ("default", None, {"max_num_seqs": "64", "threads": 2})),
    (["bench", "--load", "native", "--load-model", "m", "--url", "http://x/v1", "--speculative", "ngram"],
     ("native", "m", {"speculative": "ngram"})),
])
def test_every_loading_command_takes_backend_options_the_same_way(monkeypatch, capsys, argv, expected):
    import jupyter_llm.manager

    recorder = Recorder()
    monkeypatch.setattr(jupyter_llm.manager, "get_manager", lambda: recorder)
    assert main(argv) == 2
    assert recorder.loads == [expected]
    assert capsys.readouterr().err == "jupyter-llm: error: recorded\n"


def test_a_command_s_own_flags_and_prompts_stay_its_own():
    args = parse(["generate", "--max-tok", "3", "--device", "cpu", "Hello", "-n", "2"])
    assert args.max_tokens == 3 and args.n == 2 and args.prompt == ["Hello"]
    assert args.backend_words == ["--device", "cpu"]
    serve = parse(["serve", "--api-key", "k", "--port", "0"])
    assert serve.api_key == ["k"] and serve.backend_words == []
    with pytest.raises(ParamError, match="--backend-option expects KEY=VALUE, got 'threads'"):
        backend_options([], ["threads"])


PICK = {"type": "object", "additionalProperties": False, "required": ["answer"],
        "properties": {"answer": {"enum": ["yes", "no"]}}}


def test_generate_with_a_json_schema_file_prints_valid_json(tiny_llama, tmp_path):
    import json

    import jsonschema

    (tmp_path / "pick.json").write_text(json.dumps(PICK))
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "Answer:", "-n", "2",
                                   "--json-schema", str(tmp_path / "pick.json"), "--max-tokens", "40",
                                   "--temperature", "1", "--seed", "4"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    answers = [block.split("\n", 1)[1].strip() for block in result.stdout.split("--- prompt")[1:]]
    assert len(answers) == 2 and "finish: stop" in result.stderr
    for answer in answers:
        jsonschema.validate(json.loads(answer), PICK)


def test_generate_with_choices_prints_one_of_them(tiny_llama):
    result = subprocess.run(CLI + ["generate", "--backend", "hf", "--model", str(tiny_llama), "Pick:",
                                   "--choice", "red", "green", "dark blue", "--temperature", "1", "--seed", "2"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"red", "green", "dark blue"}


def test_regex_and_grammar_options_become_the_constraint(tmp_path):
    from jupyter_llm.structured_options import structured_from_args

    assert structured_from_args(parse(["generate", "x", "--regex", "[0-9]{3}"])).to_dict() == {"regex": "[0-9]{3}"}
    (tmp_path / "g.gbnf").write_text('root ::= "a" | "b"')
    grammar = structured_from_args(parse(["generate", "x", "--grammar", str(tmp_path / "g.gbnf")]))
    assert grammar.to_dict() == {"grammar": 'root ::= "a" | "b"'}
    assert structured_from_args(parse(["generate", "x", "--json"])).to_dict() == {"json_object": True}
    assert structured_from_args(parse(["generate", "x"])) is None


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--json-schema", "missing.json"], "--json-schema: no file 'missing.json'"),
    (["generate", "x", "--json", "--choice", "a", "b"], "give at most one of --json-schema, --json, --regex"),
    (["generate", "x", "--choice", "a", "--json"], "--choice, --grammar; got --json and --choice"),
    (["generate", "x", "--regex", "(unclosed"], "--regex: regex does not compile"),
    (["generate", "x", "--json-schema", '{"type": "objectx"}'], "--json-schema: the JSON schema is invalid at type"),
])
def test_a_bad_constraint_is_refused_before_loading(monkeypatch, capsys, argv, message):
    import jupyter_llm.manager

    recorder = Recorder()
    monkeypatch.setattr(jupyter_llm.manager, "get_manager", lambda: recorder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert recorder.loads == [] and err.startswith("jupyter-llm: error: ")
    assert message in err and err.count("\n") == 1, err
