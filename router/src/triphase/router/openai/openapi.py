"""The OpenAPI 3.1 description of the router's HTTP API, served at GET /openapi.json.

Request bodies come from the pydantic models in `protocol` (the source of truth), so the description
cannot drift from what the router validates; fuzzers (tests: schemathesis) and client generators
read it. Every error is the OpenAI error body.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from triphase.router.openai import protocol as p

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "an OpenAI error body",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for s in statuses}


def document(model: str) -> dict[str, Any]:
    """The description, with `model` as the one value the `model` field accepts."""
    refs, schema = models_json_schema([(p.ChatCompletionRequest, "validation"), (p.CompletionRequest, "validation")],
                                      ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = {**schema.get("$defs", {}), "Error": ERROR}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": [model]}

    def post(name: str, summary: str) -> dict[str, Any]:
        ref = refs[(getattr(p, name), "validation")]
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref}}},
            "responses": {"200": {"description": "the completion (JSON, or server-sent events with stream)"},
                          **_errors(400, 408, 413, 429, 503)}}}

    def get(summary: str, *errors: int) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": {"description": summary}, **_errors(*errors)}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "triphase router", "version": "v1",
                 "description": "OpenAI-compatible API of the triphase disaggregated serving router"},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionRequest", "Chat completion"),
            "/v1/completions": post("CompletionRequest", "Text completion"),
            "/v1/models": get("The served model"),
            "/healthz": get("Liveness"),
            "/readyz": get("Readiness: a decode-capable worker is available and the router is not draining", 503),
        },
        "components": {"schemas": schemas},
    }
