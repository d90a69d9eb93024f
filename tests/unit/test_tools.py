"""ToolUse: the tools a request offers, the prompt that describes them, the schema a required
call is sampled under, and the parsing of an answer that calls."""
import json

import jsonschema
import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.tools import MAX_PARALLEL_CALLS, ToolUse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_required_calls_are_a_list_of_any_tool_and_named_is_one_object_of_that_tool():
    required = ToolUse.from_openai([WEATHER, TIME], "required").constraint().schema
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    jsonschema.validate(calls, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)  # at least one call
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([calls[1]] * (MAX_PARALLEL_CALLS + 1), required)  # and a bounded number
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"town": "Paris"}}], required)  # city is required
    named = ToolUse.from_openai([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    jsonschema.validate({"name": "get_time", "arguments": {}}, named.constraint().schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "x"}}, named.constraint().schema)
    assert [t.name for t in named.offered] == ["get_time"] and "get_weather" not in named.system_prompt()
    single = ToolUse.from_openai([WEATHER], "required", parallel=False).constraint().schema
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Rome"}}, single)
    assert ToolUse.from_openai([WEATHER], "auto").constraint() is None


@pytest.mark.parametrize("text, names", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', ["get_weather"]),
    ('  [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]',
     ["get_time", "get_weather"]),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', ["get_time"]),
    ("It is sunny in Paris.", None),
    ('{"name": "launch_rockets", "arguments": {}}', None),  # not one of the tools: text
    ('{"name": "get_time"', None),  # cut short: text
    ("[1, 2, 3]", None),
])
def test_auto_parses_an_answer_that_is_a_call_and_leaves_text_alone(text, names):
    calls = ToolUse.from_openai([WEATHER, TIME]).parse(text)
    assert (None if calls is None else [c.name for c in calls]) == names
    if calls:
        assert all(c.id.startswith("call_") and isinstance(json.loads(c.arguments), dict) for c in calls)
        assert len({c.id for c in calls}) == len(calls)


def test_history_with_calls_and_results_becomes_plain_turns_after_the_tools_prompt():
    use = ToolUse.from_openai([WEATHER])
    turns = use.messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.") and "get_weather" in turns[0]["content"]
    assert json.loads(turns[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert "call_1" in turns[3]["content"] and "18 C, sunny" in turns[3]["content"]
    assert all(isinstance(t["content"], str) for t in turns)
    assert ToolUse.from_openai([WEATHER], "none").messages([{"role": "user", "content": "x"}]) == \
        [{"role": "user", "content": "x"}]  # none: the tools are not offered


@pytest.mark.parametrize("tools, choice, says", [
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice names function 'get_time'"),
    ([WEATHER], "sometimes", "tool_choice must be none, auto, required"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([{"type": "retrieval"}], None, 'tools[0] must be {"type": "function"'),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}], None,
     "the JSON schema is invalid"),
    ([WEATHER, WEATHER], None, "two functions of one name"),
    ([], "required", "tool_choice needs tools"),
])
def test_mistakes_are_one_clear_error(tools, choice, says):
    with pytest.raises(ParamError) as error:
        ToolUse.from_openai(tools, choice)
    assert says in str(error.value)
