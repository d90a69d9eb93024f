"""Tools on /v1/chat/completions: the request's `tools`, `tool_choice` and
`parallel_tool_calls` read into a `ToolUse` (jupyter_llm/tools.py), the history's tool turns
checked, and `ToolChatShape`, which answers with `tool_calls` and finish_reason "tool_calls"
when the model called, streamed the way OpenAI's client assembles them (a call goes out whole,
in one delta, once its JSON is complete).
"""
from __future__ import annotations

from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Completion
from jupyter_llm.server.protocol import APIError, ChatRequest, ChatShape, message_text
from jupyter_llm.tools import ToolUse

_CALL_STARTS = ("{", "[", "<tool_call>")


def tool_use(body: ChatRequest) -> ToolUse:
    """The request's tools (none offered when it has none, or tool_choice is "none")."""
    if body.tools is None:
        if body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return ToolUse(())
    try:
        return ToolUse.from_openai(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ParamError as error:
        param = "tool_choice" if str(error).startswith("tool_choice") else "tools"
        raise APIError(400, str(error), param=param, code="invalid_value") from None


def history(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as dicts (content as text), their tool turns checked."""
    turns = []
    for i, m in enumerate(body.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(400, f"messages.{i}.content is required (it may be null only on an assistant message "
                                f"with tool_calls)", param=f"messages.{i}.content", code="missing_required_parameter")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages.{i}: only an assistant message carries tool_calls",
                           param=f"messages.{i}.tool_calls", code="invalid_value")
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(400, f"messages.{i}: a tool message needs tool_call_id", param=f"messages.{i}.tool_call_id",
                           code="missing_required_parameter")
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                "content": None if m.content is None else message_text(m.content, i)}
        if m.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


class ToolChatShape(ChatShape):
    """ChatShape for a request that offers tools: an answer that is a call becomes tool_calls."""

    def __init__(self, use: ToolUse):
        self.use = use
        self._held: dict[int, str] = {}  # per choice: text that may still turn out to be a call
        self._started: set[int] = set()

    def choice(self, index: int, c: Completion, finish_reason: str) -> dict[str, Any]:
        calls = self.use.parse(c.text) if finish_reason == "stop" else None
        if calls is None:
            return super().choice(index, c, finish_reason)
        return {"index": index, "message": {"role": "assistant", "content": None,
                                            "tool_calls": [call.to_openai() for call in calls]},
                "finish_reason": "tool_calls", "stop_reason": None, "logprobs": None}

    def delta(self, index: int, text: str, finish_reason: str | None, stop_reason: str | None,
              logprobs: dict | None, first: bool) -> dict[str, Any] | None:
        """None while the text may still be a call (nothing to send yet)."""
        if index in self._held:
            held = self._held[index] + text
            if finish_reason is None and _may_be_call(held):
                self._held[index] = held
                return None
            del self._held[index]
            calls = self.use.parse(held) if finish_reason == "stop" else None
            if calls is not None:
                return self._out(index, {"content": None, "tool_calls": [c.to_openai(i) for i, c in enumerate(calls)]},
                                 "tool_calls", None, None)
            text = held
        elif index not in self._started and finish_reason is None and _may_be_call(text):
            self._held[index] = text
            return None
        return self._out(index, {"content": text}, finish_reason, stop_reason, logprobs)

    def _out(self, index: int, delta: dict[str, Any], finish_reason: str | None, stop_reason: str | None,
             logprobs: dict | None) -> dict[str, Any]:
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "stop_reason": stop_reason,
                "logprobs": logprobs}


def _may_be_call(text: str) -> bool:
    stripped = text.lstrip()
    return not stripped or any(stripped.startswith(s) or s.startswith(stripped) for s in _CALL_STARTS)
