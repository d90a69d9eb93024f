"""answer_bundle: every format keeps the answer's own text as the text/plain fallback."""
import json

import pytest

from jupyter_llm.notebook.display import answer_bundle, default_format
from jupyter_llm.structured import StructuredOutput


def test_json_is_pretty_once_final_and_parsed_else_plain():
    raw = '{"a": [1, 2], "b": "é"}'
    pretty = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    assert answer_bundle(raw, "json") == {"text/markdown": f"```json\n{pretty}\n```", "text/plain": pretty}
    assert answer_bundle(raw, "json", final=False) == {"text/plain": raw}  # while it streams
    assert answer_bundle('{"a": [1,', "json") == {"text/plain": '{"a": [1,'}  # cut by max_tokens
    labelled = answer_bundle(raw, "json", label=(1, 0))
    assert labelled["text/plain"] == f"[prompt 1, sample 0] {pretty}"
    assert labelled["text/markdown"].startswith("**[prompt 1, sample 0]**\n\n```json\n")


@pytest.mark.parametrize("text", ["print(1)", "see ```py\nx\n```", "a ```` b"])
def test_a_code_block_fence_outlasts_the_backticks_inside(text):
    bundle = answer_bundle(text, "code")
    fence = bundle["text/markdown"].split("\n", 1)[0]
    assert bundle["text/markdown"] == f"{fence}\n{text}\n{fence}" and fence not in text
    assert bundle["text/plain"] == text


def test_markdown_text_and_the_default_format():
    assert answer_bundle("# Title", "markdown") == {"text/markdown": "# Title", "text/plain": "# Title"}
    assert answer_bundle("# Title", "text", label=(0, 2)) == {"text/plain": "[prompt 0, sample 2] # Title"}
    assert default_format(StructuredOutput.json()) == "json"
    assert default_format(StructuredOutput.json({"type": "array"})) == "json"
    assert default_format(StructuredOutput.choice(["a"])) == "text" == default_format(None)
