"""The request fields that constrain an answer, read into one `StructuredOutput`.

OpenAI's `response_format` (text, json_object, json_schema), vLLM's `structured_outputs`
(json, regex, choice, grammar, json_object) and vLLM's older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`: a request names at most one constraint, and a mistake in it
is a 400 whose `param` is the field that carried it.
"""
from __future__ import annotations

from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.server.protocol import APIError, SamplingFields
from jupyter_llm.structured import StructuredOutput

_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# vLLM's StructuredOutputsParams names -> ours
_VLLM_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object"}


def structured_output(body: SamplingFields) -> StructuredOutput | None:
    """The request's constraint, or None (raises APIError 400)."""
    found: list[tuple[str, StructuredOutput]] = []
    if body.response_format is not None:
        structured = _checked("response_format", lambda: _response_format(body.response_format))
        if structured is not None:
            found.append(("response_format", structured))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", _checked("structured_outputs",
                                                      lambda: _vllm_fields(body.structured_outputs))))
    for field, kind in _GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            found.append((field, _checked(field, lambda kind=kind, value=value: _build(kind, value))))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"a request takes one output constraint, got {names}", param=found[1][0],
                       code="invalid_value")
    return found[0][1] if found else None


def constraint_field(body: SamplingFields) -> str | None:
    """The field that carried the request's constraint (where a compile error points)."""
    if body.response_format is not None and body.response_format.get("type") != "text":
        return "response_format"
    return next((f for f in ("structured_outputs", *_GUIDED) if getattr(body, f) is not None), None)


def _checked(field: str, build: Any) -> Any:
    try:
        return build()
    except ParamError as error:
        raise APIError(400, f"{field}: {error}", param=field, code="invalid_value") from None


def _response_format(value: dict[str, Any]) -> StructuredOutput | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ParamError('json_schema needs {"name": ..., "schema": {...}}')
        return StructuredOutput.json(spec["schema"], strict=bool(spec.get("strict") or False))
    raise ParamError(f"type must be text, json_object or json_schema, got {kind!r}")


def _vllm_fields(value: dict[str, Any]) -> StructuredOutput:
    unknown = sorted(set(value) - set(_VLLM_KINDS))
    if unknown:
        raise ParamError(f"unsupported field(s) {unknown}; this server takes one of {', '.join(_VLLM_KINDS)}")
    given = [k for k in _VLLM_KINDS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise ParamError(f"name exactly one of {', '.join(_VLLM_KINDS)}, got {given or 'none'}")
    return _build(_VLLM_KINDS[given[0]], value[given[0]])


def _build(kind: str, value: Any) -> StructuredOutput:
    if kind == "json_object":
        return StructuredOutput.json()
    if kind == "choice" and not isinstance(value, list):
        raise ParamError("choice must be a list of strings")
    if kind in ("regex", "grammar") and not isinstance(value, str):
        raise ParamError(f"{kind} must be a string")
    return StructuredOutput(kind, value)
