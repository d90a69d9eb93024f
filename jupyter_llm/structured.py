"""What a constrained answer must look like: `StructuredOutput`, one field of `SamplingParams`.

The kinds and their names are vLLM's (`StructuredOutputsParams`): `json_object` (any JSON
object), `json_schema` (a JSON Schema), `regex`, `choice` (one of a list of strings) and
`grammar` (llama.cpp's GBNF, or the Lark-like syntax of llguidance). Each is checked when it
is built, so that a mistake is a `ParamError` before a request runs, and becomes one
llguidance grammar (`grammar_text`); `backends/constraints.py` compiles that grammar for a
backend's tokenizer and the shared sampler masks the logits with it.

JSON comes out on one line with fixed separators (", " and ": ") and no other whitespace
between tokens: a sampled answer cannot loop on blanks until max_tokens (what xgrammar's
`max_whitespace_cnt` bounds in vLLM).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from jupyter_llm.errors import ParamError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_CHOICES = 1024
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the text of an answer.

    `spec` is the canonical JSON text of the schema (json_schema), the pattern (regex), the
    grammar's text (grammar), or the tuple of options (choice); json_object has none.
    `strict` (OpenAI's json_schema flag): an object without `additionalProperties` takes no
    properties beyond its own (as OpenAI's strict mode and xgrammar's strict mode), and a schema
    keyword the compiler does not implement is an error instead of being ignored."""

    kind: str
    spec: str | tuple[str, ...] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParamError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "json_schema":
            object.__setattr__(self, "spec", _schema_text(self.spec))
        if self.kind == "choice" and not isinstance(self.spec, tuple):
            object.__setattr__(self, "spec", tuple(self.spec) if isinstance(self.spec, (list, tuple)) else self.spec)
        self._check()
        problem = _grammar_problem(self.grammar_text())
        if problem:
            raise ParamError(f"{self.describe()} does not compile: {problem}")

    # --- building ----------------------------------------------------------------------
    @classmethod
    def json(cls, schema: dict[str, Any] | str | None = None, strict: bool = False) -> StructuredOutput:
        """Any JSON object (no schema), or JSON valid against `schema` (a dict or its JSON text)."""
        return cls("json_object") if schema is None else cls("json_schema", schema, strict)  # type: ignore[arg-type]

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> StructuredOutput:
        return cls("choice", tuple(options))

    @classmethod
    def grammar(cls, text: str) -> StructuredOutput:
        return cls("grammar", text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutput:
        """From `to_dict`'s shape: {"json_schema": {...}} | {"regex": "..."} | {"choice": [...]}
        | {"grammar": "..."} | {"json_object": true}, plus "strict" beside json_schema."""
        kinds = [k for k in KINDS if data.get(k) not in (None, False)]
        unknown = sorted(set(data) - set(KINDS) - {"strict"})
        if unknown or len(kinds) != 1:
            raise ParamError(f"a structured output names exactly one of {', '.join(KINDS)}"
                             + (f"; unknown field(s) {unknown}" if unknown else f", got {kinds or 'none'}"))
        kind = kinds[0]
        return cls(kind, None if kind == "json_object" else data[kind], bool(data.get("strict", False)))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "json_object":
            return {"json_object": True}
        if self.kind == "json_schema":
            return {"json_schema": self.schema, "strict": self.strict}
        return {self.kind: list(self.spec) if self.kind == "choice" else self.spec}  # type: ignore[arg-type]

    # --- reading -----------------------------------------------------------------------
    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema an answer validates against (json_object: any object)."""
        if self.kind == "json_object":
            return {"type": "object"}
        return json.loads(self.spec) if self.kind == "json_schema" else None  # type: ignore[arg-type]

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {len(self.spec or ())}"
        return "JSON object" if self.kind == "json_object" else self.kind.replace("_", " ")

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form), the same for equal constraints."""
        return _grammar(self.kind, self.spec, self.strict)

    def _check(self) -> None:
        if self.kind == "json_object":
            if self.spec is not None:
                raise ParamError("json_object takes no schema (use json_schema)")
        elif self.kind == "choice":
            options = self.spec
            if not isinstance(options, tuple) or not options:
                raise ParamError("choice needs a non-empty list of strings")
            if not all(isinstance(o, str) and o for o in options):
                raise ParamError("choice options must be non-empty strings")
            if len(options) > MAX_CHOICES:
                raise ParamError(f"choice takes at most {MAX_CHOICES} options, got {len(options)}")
        elif self.kind in ("regex", "grammar") and (not isinstance(self.spec, str) or not self.spec.strip()):
            raise ParamError(f"{self.kind} must be a non-empty string")


def _schema_text(schema: Any) -> str:
    """A JSON Schema (dict or JSON text) checked against its metaschema, as canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ParamError(f"the JSON schema is not JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise ParamError(f"a JSON schema is an object, got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise ParamError(f"the JSON schema is invalid at {where}: {error.message}") from None
    return json.dumps(schema, separators=(",", ":"))  # its order: properties are generated in it


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, spec: str | tuple[str, ...] | None, strict: bool) -> str:
    from llguidance import LLMatcher, grammar_from

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_LAYOUT)
    if kind == "json_schema":
        schema = closed_objects(json.loads(spec)) if strict else spec  # type: ignore[arg-type]
        return LLMatcher.grammar_from_json_schema(schema, defaults={**_JSON_LAYOUT, "lenient": not strict})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)  # type: ignore[arg-type]
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in spec))  # type: ignore[union-attr]
    try:
        return grammar_from("grammar", spec)  # type: ignore[arg-type]
    except ValueError as error:  # GBNF that does not convert (a rule that is not defined...)
        why = str(error).removeprefix("Failed to convert the grammar from GBNF to Lark: ")
        raise ParamError(f"grammar does not compile: {why}") from None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed_objects(schema: Any) -> Any:
    """`schema` with additionalProperties false on every object schema that does not say."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            closed[key] = [closed_objects(sub) for sub in schema[key]]
    for key in _SCHEMAS:
        if key in schema:
            closed[key] = [closed_objects(sub) for sub in schema[key]] if isinstance(schema[key], list) \
                else closed_objects(schema[key])
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


@functools.lru_cache(maxsize=256)
def _grammar_problem(grammar: str) -> str:
    """Why llguidance refuses a grammar ("" when it compiles); the message's first lines."""
    from llguidance import LLMatcher

    problem = LLMatcher.validate_grammar(grammar)
    return " ".join(line.strip() for line in problem.strip().splitlines()[:3])
