"""The grammar a request's output must follow, from `response_format` or the `structured_outputs`
extension: built and validated here (common/grammar.py), before the request takes any worker time.
A schema that is too large or too deep, or that the grammar engine cannot compile, is a 400 naming
the field."""

from __future__ import annotations

import re

from triphase.common import grammar
from triphase.router.errors import BadRequest
from triphase.router.openai import protocol as p


def grammar_for(req: p.SamplingFields) -> str:
    """The request's grammar ("" when its output is free text)."""
    fmt, ext = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type != "text" and ext is not None:
        raise BadRequest("give `response_format` or `structured_outputs`, not both", param="structured_outputs")
    try:
        if ext is not None:
            return _extension(ext)
        if fmt is None or fmt.type == "text":
            return ""
        if fmt.type == "json_object":
            return grammar.json_object()
        assert fmt.json_schema is not None  # ResponseFormat checks it
        return grammar.json_schema(fmt.json_schema.schema_ or {})
    except grammar.GrammarError as exc:
        raise BadRequest(str(exc), param="structured_outputs" if ext is not None else "response_format",
                         code="invalid_schema") from None


def _extension(ext: p.StructuredOutputs) -> str:
    if ext.json_ is not None:
        return grammar.json_schema(ext.json_)
    if ext.regex is not None:
        return grammar.regex(ext.regex)
    if ext.grammar is not None:
        return grammar.lark(ext.grammar)
    assert ext.choice is not None
    return grammar.regex("|".join(f"({re.escape(choice)})" for choice in ext.choice))
