"""Scorers of generated completions for `posttrain eval`: built-ins and Python functions.

Every scorer has the reward functions' signature (TRL's), so a GRPO reward function is a scorer
as it is and the built-ins are plain functions of the same shape:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

Built-in kinds (each reads the reference from a record field, `field`):
- exact_match: the completion (stripped) equals the field's value (`ignore_case`).
- numeric_match: the last number in the completion equals the field's number within `tolerance`.
- regex: `pattern` is found in the completion (re.search); 1 or 0.
- json_schema: the completion parses as JSON (a ```json fence is unwrapped) and is valid under
  `schema` (inline) or the schema in the record's `field` (the `jsonschema` package validates).
- function: `fn`, an import path.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from ..config import ConfigError, Strict, resolve_import_path

Kind = Literal["exact_match", "numeric_match", "regex", "json_schema", "function"]
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


class ScorerSpec(Strict):
    kind: Kind = Field(description="exact_match | numeric_match | regex | json_schema | function")
    name: str | None = Field(None, description="metric name (default: the kind, or the function's name)")
    field: str | None = Field(None, description="the record field holding the reference (exact_match, numeric_match; "
                              "json_schema: a per-record schema)")
    ignore_case: bool = Field(False, description="exact_match: compare case-insensitively")
    tolerance: float = Field(0.0, ge=0, description="numeric_match: largest accepted absolute difference")
    pattern: str | None = Field(None, description="regex: a Python regular expression searched for in the completion")
    json_schema: dict[str, Any] | None = Field(None, description="json_schema: the JSON schema every completion must satisfy")
    fn: str | None = Field(None, description="function: import path of fn(prompts, completions, completion_ids, **columns)")

    @model_validator(mode="after")
    def _needs(self):
        need = {"exact_match": "field", "numeric_match": "field", "regex": "pattern", "function": "fn"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"a {self.kind} scorer needs `{need}`")
        if self.kind == "json_schema" and (self.json_schema is None) == (self.field is None):
            raise ValueError("a json_schema scorer needs exactly one of `json_schema` (inline) or `field` (per record)")
        if self.kind == "regex":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"regex scorer: bad pattern {self.pattern!r}: {e}") from None
        return self


def _column(columns: dict, field: str) -> list:
    if field not in columns:
        raise KeyError(f"the records have no field {field!r} (fields: {', '.join(sorted(columns)) or 'none'})")
    return columns[field]


def exact_match(field: str, ignore_case: bool) -> Callable:
    def norm(x) -> str:
        x = str(x).strip()
        return x.lower() if ignore_case else x

    def exact_match(completions, **columns):
        refs = _column(columns, field)
        return [float(norm(c) == norm(r)) for c, r in zip(completions, refs)]

    return exact_match


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(field: str, tolerance: float) -> Callable:
    def numeric_match(completions, **columns):
        out = []
        for c, r in zip(completions, _column(columns, field)):
            ref = r if isinstance(r, (int, float)) else last_number(str(r))
            if ref is None:
                raise ValueError(f"numeric_match: the reference {r!r} in field {field!r} holds no number")
            got = last_number(c)
            out.append(float(got is not None and abs(got - float(ref)) <= tolerance))
        return out

    return numeric_match


def regex(pattern: str) -> Callable:
    rx = re.compile(pattern)

    def regex(completions, **_):
        return [float(rx.search(c) is not None) for c in completions]

    return regex


def json_schema(schema: dict | None, field: str | None) -> Callable:
    try:
        import jsonschema
    except ImportError:
        raise ConfigError("a json_schema scorer needs the jsonschema package (pip install jsonschema)") from None
    if schema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"json_schema scorer: the schema is not a valid JSON schema: {e.message}") from None

    def json_schema(completions, **columns):
        schemas = [schema] * len(completions) if field is None else _column(columns, field)
        out = []
        for c, s in zip(completions, schemas):
            m = FENCE.match(c)
            try:
                value = json.loads(m.group(1) if m else c)
            except ValueError:
                out.append(0.0)
                continue
            out.append(float(jsonschema.validators.validator_for(s)(s).is_valid(value)))
        return out

    return json_schema


def build(spec: ScorerSpec, *, key: str) -> tuple[str, Callable]:
    """(metric name, scorer function) of a spec."""
    if spec.kind == "function":
        fn = resolve_import_path(spec.fn, key=f"{key}.fn")
        return spec.name or getattr(fn, "__name__", "function"), fn
    fn = {
        "exact_match": lambda: exact_match(spec.field, spec.ignore_case),
        "numeric_match": lambda: numeric_match(spec.field, spec.tolerance),
        "regex": lambda: regex(spec.pattern),
        "json_schema": lambda: json_schema(spec.json_schema, spec.field if spec.json_schema is None else None),
    }[spec.kind]()
    return spec.name or spec.kind, fn
