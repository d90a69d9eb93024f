"""Tool calling over any chat model: the tools are described in a system prompt (the fallback
that works whatever the chat template), a call is a JSON object {"name": ..., "arguments":
{...}} (a JSON list of them when parallel calls are allowed), and:

- tool_choice "required" or a named function: the answer is constrained to such calls (a
  JSON schema built from the tools' parameters), so it always parses;
- "auto": the model answers freely; an answer that is a call (or a list of calls, optionally
  inside <tool_call> tags) becomes `tool_calls`, anything else stays text;
- "none": the tools are not offered.

A conversation's history may carry assistant `tool_calls` and `role: "tool"` results; both are
rendered as plain turns for the template (an assistant turn holding the calls' JSON, a user
turn holding the result).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Message
from jupyter_llm.structured import StructuredOutput, closed_objects

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAGGED = re.compile(r"^\s*<tool_call>(.*?)</tool_call>\s*$", re.DOTALL)
CHOICES = ("none", "auto", "required")
# The most calls in one answer when parallel calls are allowed: a model that keeps adding calls
# stops there rather than at max_tokens.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_openai(cls, spec: Any, index: int = 0) -> Tool:
        """One entry of a request's `tools`: {"type": "function", "function": {"name", "description",
        "parameters"}}."""
        where = f"tools[{index}]"
        if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
            raise ParamError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        function = spec["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ParamError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        StructuredOutput.json(parameters)  # a schema that is not one is this tool's error, said now
        return cls(name, str(function.get("description") or ""), parameters)

    def call_schema(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": self.name}, "arguments": closed_objects(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of its tools: which, how they may be chosen, whether in parallel."""

    tools: tuple[Tool, ...]
    choice: str = "auto"  # none | auto | required | named
    function: str | None = None  # the named function
    parallel: bool = True

    @classmethod
    def from_openai(cls, tools: list[Any], tool_choice: Any = None, parallel: bool | None = None) -> ToolUse:
        parsed = tuple(Tool.from_openai(t, i) for i, t in enumerate(tools))
        names = [t.name for t in parsed]
        if len(set(names)) != len(names):
            raise ParamError(f"tools has two functions of one name: {names}")
        choice, function = tool_choice or "auto", None
        if isinstance(choice, dict):
            function = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if function not in names:
                raise ParamError(f"tool_choice names function {function!r}, which is not in tools "
                                 f"(tools: {', '.join(names) or 'none'})")
            choice = "named"
        elif choice not in CHOICES:
            raise ParamError(f"tool_choice must be none, auto, required or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": ...}}}}, got {choice!r}")
        if not parsed and choice != "none":
            raise ParamError("tool_choice needs tools")
        return cls(parsed, choice, function, True if parallel is None else parallel)

    @property
    def offered(self) -> tuple[Tool, ...]:
        if self.choice == "none":
            return ()
        return tuple(t for t in self.tools if t.name == self.function) if self.function else self.tools

    @property
    def many(self) -> bool:
        return self.parallel and self.choice != "named"

    def system_prompt(self) -> str:
        """The fallback prompt: the offered tools and how to call them."""
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
                           for t in self.offered)
        shape = ('a JSON list of calls, each {"name": <function name>, "arguments": {<its parameters>}}'
                 if self.many else 'one JSON object {"name": <function name>, "arguments": {<its parameters>}}')
        must = "You must call a function." if self.choice in ("required", "named") else \
            "If a function helps, answer with only the call; otherwise answer normally."
        return f"You can call these functions:\n{listed}\nTo call, answer with {shape}. {must}"

    def constraint(self) -> StructuredOutput | None:
        """The schema a required or named call is sampled under (None: the model chooses)."""
        if self.choice not in ("required", "named"):
            return None
        calls = [t.call_schema() for t in self.offered]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        many = {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS, "items": one}
        return StructuredOutput.json(many if self.many else one)

    def messages(self, history: list[dict[str, Any]]) -> list[Message]:
        """The conversation as plain turns, the tools' prompt first (beside a system message)."""
        turns = [_plain_turn(m) for m in history]
        if not self.offered:
            return turns
        if turns and turns[0]["role"] == "system":
            return [{"role": "system", "content": f"{turns[0]['content']}\n\n{self.system_prompt()}"}] + turns[1:]
        return [{"role": "system", "content": self.system_prompt()}] + turns

    def parse(self, text: str) -> list[ToolCall] | None:
        """The calls an answer makes, or None when it is text."""
        if not self.offered:
            return None
        tagged = _TAGGED.match(text)
        body = (tagged.group(1) if tagged else text).strip()
        if not body.startswith(("{", "[")):
            return None
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        names = {t.name for t in self.offered}
        if not items or not all(isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments"), dict)
                                for c in items):
            return None
        return [ToolCall(c["name"], json.dumps(c["arguments"]), "call_" + uuid.uuid4().hex[:24]) for c in items]


def _plain_turn(message: dict[str, Any]) -> Message:
    """An OpenAI message with tool_calls or of role tool, as a {role, content} turn."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"Result of the call {message.get('tool_call_id', '')}: "
                                           f"{message.get('content') or ''}"}
    calls = message.get("tool_calls")
    if calls:
        made = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                for c in calls]
        content = (message.get("content") or "") + json.dumps(made if len(made) > 1 else made[0])
        return {"role": "assistant", "content": content}
    return {"role": message["role"], "content": message.get("content") or ""}


def _arguments(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else (text or {})
    except json.JSONDecodeError:
        return text
