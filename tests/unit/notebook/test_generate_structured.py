"""%%generate with a constraint (--json-schema, --json, --regex, --choice, --grammar) and a
rendering (-f): what a notebook keeps of each output is its last display update."""
import json
import re

import jsonschema
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer", "n"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
RUN = "%%generate --backend tiny-hf --max-tokens 60 --temperature 1 --seed 3"


def stored(captured):
    """Each output as a notebook stores it: a display in its last update."""
    last, order = {}, []
    for i, out in enumerate(captured.outputs):
        key = (out.transient or {}).get("display_id", i)
        if key not in last:
            order.append(key)
        last[key] = out.data
    return [last[key] for key in order]


def run(shell, cell):
    with capture_output() as captured:
        shell.run_cell(cell)
    return stored(captured), captured.stdout


def define_schema(shell, tmp_path, source):
    if source == "dict":
        shell.user_ns["schema"] = ANSWER
    elif source == "json text":
        shell.user_ns["schema"] = json.dumps(ANSWER)
    elif source == "pydantic":
        shell.run_cell("from typing import Literal\nfrom pydantic import BaseModel, ConfigDict, Field\n"
                       "class Answer(BaseModel):\n    model_config = ConfigDict(extra='forbid')\n"
                       "    answer: Literal['yes', 'no']\n    n: int = Field(ge=0, le=9)\nschema = Answer")
    else:
        (tmp_path / "answer.json").write_text(json.dumps(ANSWER))
        return str(tmp_path / "answer.json")
    return "schema"


@pytest.mark.parametrize("source", ["dict", "json text", "pydantic", "file"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_json_schema_answer_validates_and_renders_as_pretty_json(shell, tiny_hf, tmp_path, source, stream):
    name = define_schema(shell, tmp_path, source)
    outputs, printed = run(shell, f"{RUN} -n 2 --json-schema {name} -o out {'' if stream else '--no-stream'}\n"
                                  "Answer as JSON:")
    out = shell.user_ns["out"]
    assert len(out) == len(outputs) == 2
    for c, bundle in zip(out, outputs):
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(c.parsed, ANSWER)
        assert c.parsed == json.loads(c.text)
        pretty = json.dumps(c.parsed, indent=2)
        assert bundle["text/plain"] == f"[prompt 0, sample {c.index}] {pretty}"  # the fallback, final
        assert f"```json\n{pretty}\n```" in bundle["text/markdown"]
    assert "finish: stop" in printed


def test_json_any_object_and_format_text_keeps_the_raw_answer(shell, tiny_hf):
    [bundle], _ = run(shell, f"{RUN} --json -f text -o out\nJSON:")
    [c] = shell.user_ns["out"]
    assert c.text.startswith("{") and bundle == {"text/plain": c.text}
    if c.finish_reason == "stop":
        assert isinstance(c.parsed, dict)


def test_choice_regex_and_grammar_hold(shell, tiny_hf, tmp_path):
    run(shell, f"{RUN} -n 4 --choice Paris London 'New York' -o out\nThe capital:")
    assert {c.text for c in shell.user_ns["out"]} <= {"Paris", "London", "New York"}
    run(shell, f"{RUN} -n 4 --regex '[0-9]{{3}}-[A-Z]{{2}}' -o out\nA code:")
    assert all(re.fullmatch(r"[0-9]{3}-[A-Z]{2}", c.text) for c in shell.user_ns["out"])
    shell.user_ns["colours"] = 'root ::= "red" | "green" | "blue"'
    run(shell, f"{RUN} -n 4 --grammar colours -o out\nA colour:")
    assert {c.text for c in shell.user_ns["out"]} <= {"red", "green", "blue"}
    (tmp_path / "size.lark").write_text('start: "small" | "large"')
    outputs, _ = run(shell, f"{RUN} -n 2 --grammar {tmp_path / 'size.lark'} -o out\nA size:")
    assert {c.text for c in shell.user_ns["out"]} <= {"small", "large"}
    assert [b["text/plain"].split("] ", 1)[1] for b in outputs] == [c.text for c in shell.user_ns["out"]]


@pytest.mark.parametrize("options,message", [
    ("--json --regex a", "give at most one of --json-schema, --json, --regex, --choice, --grammar; got --json"),
    ("--json-schema nope", "--json-schema: no variable 'nope' in the notebook, nor a file of that name"),
    ("--json-schema missing/person.json", "--json-schema: no file 'missing/person.json'"),
    ("--json-schema bad", "--json-schema: the JSON schema is invalid at type"),
    ("--json-schema number", "--json-schema: got a value of type int"),
    ("--json-schema '{\"type\": '", "--json-schema: the JSON schema is not JSON"),
    ("--choice", "argument --choice: expected at least one argument"),
    ("--choice a ''", "--choice: choice options must be non-empty strings"),
    ("--regex '[a-'", "--regex: regex does not compile"),
    ("--grammar nope", "--grammar: no variable 'nope'"),
    ("--grammar number", "--grammar: 'number' is of type int"),
    ("--grammar broken", "--grammar: grammar does not compile"),
    ("-f html", "argument -f/--format: invalid choice: 'html'"),
])
def test_a_bad_constraint_is_one_line_before_anything_runs(shell, tiny_hf, monkeypatch, options, message):
    from jupyter_llm.notebook import magics

    monkeypatch.setattr(magics.LLMMagics, "_run_generate", lambda *a, **k: pytest.fail("it ran"))
    shell.user_ns.update(bad={"type": "objectx"}, number=3, broken="root ::= undefined-rule")
    with pytest.raises(UsageError) as info:
        shell.run_cell(f"%%generate {options}\nHello")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("fmt", ["text", "markdown", "code", "json"])
@pytest.mark.parametrize("stream", [True, False])
def test_formats_render_the_answer_with_a_text_fallback(shell, tiny_hf, fmt, stream):
    [bundle], _ = run(shell, f"{RUN} --max-tokens 8 -f {fmt} -o out {'' if stream else '--no-stream'}\nHi")
    [c] = shell.user_ns["out"]
    assert bundle["text/plain"] == c.text  # a random model's text: not JSON, so json keeps it plain
    markdown = bundle.get("text/markdown")
    if fmt == "markdown":
        assert markdown == c.text
    elif fmt == "code":
        fence = markdown.split("\n", 1)[0]
        assert set(fence) == {"`"} and len(fence) >= 3 and fence not in c.text
        assert markdown == f"{fence}\n{c.text}\n{fence}"
    else:
        assert markdown is None
