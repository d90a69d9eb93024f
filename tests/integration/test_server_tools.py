"""Tool calling through the server with the official openai client, on a random-weight model:
a required or named call always parses and its arguments validate, streamed or not, and a
two-turn exchange (call, tool result, answer) works."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_helpers import assert_openai_error, running_server

WEATHER_PARAMS = {"type": "object", "required": ["city", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(manager, tmp_path_factory):
    from tiny_models import tiny_llama_folder

    # the tools' prompt is long in a 300-token vocabulary: a context of 4096
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny-tools"), max_position_embeddings=4096)
    manager.load("hf", str(folder), name="tiny-tools", progress=False)
    try:
        with running_server(manager) as s:
            yield s
    finally:
        manager.unload("tiny-tools")


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def assert_valid_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_calls_with_valid_arguments(client, parallel):
    answer = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=parallel, max_tokens=600, temperature=1.0, seed=3,
                                            n=3)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)
        assert parallel or len(choice.message.tool_calls) == 1


def test_a_named_function_is_the_one_called_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice=named,
                                            max_tokens=100, temperature=1.0, seed=8)
    assert_valid_calls(answer.choices[0].message.tool_calls, {"get_time"})
    stream = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice=named,
                                            max_tokens=100, temperature=1.0, seed=8, stream=True)
    pieces, finish = {}, None
    for chunk in stream:  # assembled the way the client's own stream helpers do: by index
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = pieces.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [p["name"] for p in pieces.values()] == ["get_time"]
    assert json.loads(pieces[0]["arguments"]) == json.loads(answer.choices[0].message.tool_calls[0].function.arguments)


def test_a_two_turn_exchange(client):
    first = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=600, temperature=0)
    message = first.choices[0].message
    assert_valid_calls(message.tool_calls)
    history = ASK + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"} for call in message.tool_calls]
    final = client.chat.completions.create(model="tiny-tools", messages=history, tools=TOOLS, max_tokens=12,
                                           temperature=0)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert (choice.message.content is not None) != bool(choice.message.tool_calls)


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
])
def test_mistakes_are_a_400_naming_the_field_and_the_server_keeps_serving(server, client, body, param):
    import httpx

    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-tools", "messages": ASK, **body},
                          timeout=60)
    assert_openai_error(response, 400, param)
    ok = client.chat.completions.create(model="tiny-tools", messages=ASK, max_tokens=2)
    assert ok.choices[0].message.content is not None
