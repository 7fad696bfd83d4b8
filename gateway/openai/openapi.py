"""How the OpenAI routes read in /docs/openapi.json where Litestar cannot infer it from their
signatures: a generation answers one JSON object, or with `"stream": true` server-sent events,
and every error is OpenAI's body (the statuses come from gateway/errors.py's table).

An event stream's `schema` describes one event (OpenAPI 3.1; 3.2 calls it `itemSchema`): its
`data` is a chunk as JSON, an error body if the engine fails mid-stream, or the final "[DONE]".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation

from gateway.errors import error_responses
from gateway.openai.schemas import ErrorResponse

BEARER = [{"bearer": []}]  # the API-key scheme the app's OpenAPI config declares


def generation_responses(answer: type[msgspec.Struct]) -> dict[int, ResponseSpec]:
    """A generation route's `responses=`: its answer, and every error it can return."""
    ok = ResponseSpec(
        answer,
        description="The answer; server-sent events with stream=true",
        generate_examples=False,
    )
    return {200: ok} | error_responses(400, 401, 403, 404, 413, 429, 500, 503)


def json_or_events(chunk: type[msgspec.Struct]) -> type[Operation]:
    """An `operation_class=` that adds the event stream to the 200 the handler documents (a
    `ResponseSpec` holds one media type)."""
    events = OpenAPIMediaType(schema=event_schema(chunk))

    @dataclass
    class JsonOrEvents(Operation):
        def __post_init__(self) -> None:
            self.responses["200"].content["text/event-stream"] = events

    return JsonOrEvents


def event_schema(chunk: type[msgspec.Struct]) -> dict[str, Any]:
    """One server-sent event of a stream of `chunk`s, self-contained (no references: the
    component names would clash with Litestar's own)."""
    (chunk_schema, error_schema), defs = msgspec.json.schema_components((chunk, ErrorResponse))
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_inline(chunk_schema, defs), _inline(error_schema, defs)]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with every "#/$defs/X" reference replaced by X itself (none is recursive)."""
    if isinstance(schema, dict):
        if ref := schema.get("$ref"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(value, defs) for value in schema]
    return schema
