"""The status table (gateway/errors.py): every row's status, body and headers, the MRO lookup,
the fallback for a bug, and the two documents that list the table."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

import gateway.errors
from controlplane.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unauthenticated,
)
from controlplane.keys import InvalidKey
from engine.errors import ContextOverflow, EngineDead, EngineError, InvalidRequest, Overloaded
from gateway.auth.errors import MissingKey, PermissionDenied
from gateway.errors import (
    ERRORS,
    ModelLoadFailed,
    ModelLoading,
    ModelNotFound,
    ModelUnavailable,
    classify,
    error_responses,
)
from gateway.limits.errors import LimiterUnavailable, RateLimited, TooLargeForLimit
from gateway.openai.chat_template import (
    ChatTemplateError,
    NoChatTemplate,
    TemplateRaised,
    TemplateUnsafe,
)
from gateway.openai.errors import ClientDisconnected, InvalidParameter, OutputFailed
from gateway.openai.schemas import ErrorResponse
from registry.errors import GateFailed

ROOT = Path(__file__).resolve().parents[2]
INVALID, SERVER = "invalid_request_error", "server_error"


class Temperature(msgspec.Struct):
    temperature: float


def _decode_error(data: bytes) -> msgspec.DecodeError:
    try:
        msgspec.json.decode(data, type=Temperature)
    except msgspec.DecodeError as e:
        return e
    raise AssertionError(f"{data!r} decoded")


# (exception, status, type, code, param, headers): what each row answers today
ROWS = [
    (_decode_error(b'{"temperature": "hot"}'), 400, INVALID, "invalid_value", "temperature", {}),
    (_decode_error(b"{not json"), 400, INVALID, "invalid_json", None, {}),
    (
        ValidationException(extra=[{"key": "data", "message": "Expected `int` - at `$.n`"}]),
        400, INVALID, "invalid_value", "n", {},
    ),
    (InvalidParameter("stop", "too many"), 400, INVALID, None, "stop", {}),
    (
        InvalidParameter("prompt", "too long", code="context_length_exceeded"),
        400, INVALID, "context_length_exceeded", "prompt", {},
    ),
    (ContextOverflow(60, 10, 64), 400, INVALID, "context_length_exceeded", "max_tokens", {}),
    (InvalidRequest("empty prompt"), 400, INVALID, "invalid_value", "max_tokens", {}),
    (TemplateRaised("system first"), 400, INVALID, "chat_template", "messages", {}),
    (NoChatTemplate("no template"), 400, INVALID, "chat_template", "messages", {}),
    (TooLargeForLimit("too big"), 400, INVALID, "tokens_exceed_limit", "max_tokens", {}),
    (MissingKey("no key"), 401, INVALID, "invalid_api_key", None, {}),
    (InvalidKey("bad key"), 401, INVALID, "invalid_api_key", None, {}),
    (PermissionDenied("no scope", "inference"), 403, "permission_error", "missing_scope", None, {}),
    (InvalidInput("role 'x'", "role"), 400, INVALID, "invalid_value", "role", {}),
    (Unauthenticated("bad password"), 401, INVALID, "unauthenticated", None, {}),
    (Forbidden("a viewer may not"), 403, "permission_error", "forbidden", None, {}),
    (NotFound("no project", "project_id"), 404, INVALID, "not_found", "project_id", {}),
    (Conflict("exists", "email"), 409, INVALID, "conflict", "email", {}),
    (TooLarge("over 1 MB", "file"), 413, INVALID, "too_large", "file", {}),
    (GateFailed("refused by gate parity"), 422, INVALID, "gate_failed", "version", {}),
    (
        QuotaExceeded("tokens_per_day used up", "tokens_per_day", datetime(2020, 1, 1, tzinfo=UTC)),
        429, "rate_limit_error", "quota_exceeded", None, {"Retry-After": "1"},
    ),
    (ModelNotFound("nope", "unknown"), 404, INVALID, "model_not_found", "model", {}),
    (NotFoundException(), 404, INVALID, "not_found", None, {}),
    (
        MethodNotAllowedException(headers={"allow": "POST"}),
        405, INVALID, "method_not_allowed", None, {"allow": "POST"},
    ),
    (RequestEntityTooLarge(detail="over 1024 bytes"), 413, INVALID, "body_too_large", None, {}),
    (HTTPException(status_code=400, detail="bad host"), 400, INVALID, None, None, {}),
    (
        RateLimited("slow down", 2.2, {"x-ratelimit-limit-requests": "2"}),
        429, "rate_limit_error", "rate_limit_exceeded", None,
        {"Retry-After": "3", "x-ratelimit-limit-requests": "2"},
    ),
    (ClientDisconnected(), 499, INVALID, "client_disconnected", None, {}),
    (ChatTemplateError("undefined x"), 500, SERVER, "chat_template", None, {}),
    (TemplateUnsafe("__class__"), 500, SERVER, "chat_template", None, {}),
    (OutputFailed("tiny:1", "chatcmpl-1", "boom"), 500, SERVER, "output_failed", None, {}),
    (Overloaded(5, 4, 0.2), 503, SERVER, "overloaded", None, {"Retry-After": "1"}),
    (ModelLoading("tiny:1", 7.0), 503, SERVER, "model_loading", None, {"Retry-After": "4"}),
    (ModelUnavailable("full", 5.0), 503, SERVER, "engine_unavailable", None, {"Retry-After": "5"}),
    (ModelUnavailable("too big", None), 503, SERVER, "engine_unavailable", None, {}),
    (EngineDead("runtime crashed"), 503, SERVER, "engine_unavailable", None, {}),
    (ModelLoadFailed("m:2", ValueError("sha256 mismatch")), 503, SERVER, "model_load_failed", None,
     {"Retry-After": "5"}),  # fmt: skip
    (LimiterUnavailable("redis down"), 503, SERVER, "limiter_unavailable", None, {}),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "status", "type_", "code", "param", "headers"), ROWS,
                         ids=[f"{type(r[0]).__name__}-{i}" for i, r in enumerate(ROWS)])  # fmt: skip
def test_each_error_answers_its_row(exc, status, type_, code, param, headers):
    got_status, body, got_headers = classify(exc)
    assert (got_status, got_headers) == (status, headers)
    assert body == {"error": {"message": body["error"]["message"], "type": type_,
                              "param": param, "code": code}}  # fmt: skip
    assert body["error"]["message"]
    msgspec.convert(body, ErrorResponse)  # the shape the OpenAPI schema documents


def test_the_rows_cover_every_table_entry():
    covered = {cls for exc, *_ in ROWS for cls in type(exc).__mro__ if cls in ERRORS}
    assert covered == set(ERRORS)


def test_a_quota_answer_says_when_it_resets():
    resets_at = datetime.now(UTC) + timedelta(seconds=90)
    _, _, headers = classify(QuotaExceeded("used up", "tokens_per_day", resets_at))
    assert 85 <= int(headers["Retry-After"]) <= 90


def test_messages_are_the_errors_own_words():
    assert classify(RequestEntityTooLarge(detail="over 1024 bytes"))[1]["error"]["message"] == (
        "over 1024 bytes"
    )
    message = classify(_decode_error(b"{not json"))[1]["error"]["message"]
    assert message.startswith("the body is not valid JSON: ")
    assert classify(ContextOverflow(60, 10, 64))[1]["error"]["message"] == str(
        ContextOverflow(60, 10, 64)
    )


def test_an_output_failure_names_the_request_and_keeps_the_engine_message_in_the_log(caplog):
    exc = OutputFailed("tiny:1", "chatcmpl-1", "KeyError in /srv/engine/detokenizer.py")
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        message = classify(exc)[1]["error"]["message"]
    assert "chatcmpl-1" in message and "/srv" not in message
    assert "/srv/engine/detokenizer.py" in caplog.text


def test_a_subclass_answers_as_its_base_unless_it_has_a_row():
    class Busier(Overloaded):
        pass

    assert classify(Busier(9, 4, 2.0))[:1] == (503,)
    assert classify(Busier(9, 4, 2.0))[1]["error"]["code"] == "overloaded"
    # msgspec.ValidationError is a DecodeError: its own row wins
    assert classify(_decode_error(b"[]"))[1]["error"]["code"] == "invalid_value"
    # TemplateRaised is a ChatTemplateError (500) with its own row (400)
    assert classify(TemplateRaised("no"))[0] == 400


def test_anything_else_is_a_logged_500_that_tells_nothing(caplog):
    for exc in (RuntimeError("secret path /srv/x"), EngineError("bare")):
        with caplog.at_level(logging.ERROR, logger="gateway.errors"):
            status, body, headers = classify(exc)
        assert (status, headers) == (500, {})
        assert body["error"] == {"message": "internal error; see the gateway's log",
                                 "type": SERVER, "param": None, "code": "internal_error"}  # fmt: skip
        assert caplog.records[-1].exc_info[1] is exc


def test_litestar_validation_names_the_field():
    missing = ValidationException(extra=[{"key": "data", "message": "'data'"}])
    status, body, _ = classify(missing)
    assert status == 400 and body["error"]["param"] is None
    assert "no body" in body["error"]["message"]
    unknown = ValidationException(
        extra=[{"key": "messages[0]", "message": "Object contains unknown field `rol`"}]
    )
    error = classify(unknown)[1]["error"]
    assert error["param"] == "messages[0].rol"
    assert error["message"] == "messages[0].rol: Object contains unknown field `rol`"


def test_error_responses_document_the_table():
    specs = error_responses(401, 429, 503)
    assert set(specs) == {401, 429, 503}
    assert all(spec.data_container is ErrorResponse for spec in specs.values())
    assert "invalid_api_key" in specs[401].description
    for code in ("overloaded", "model_loading", "engine_unavailable", "limiter_unavailable"):
        assert code in specs[503].description


@pytest.mark.parametrize(
    "document",
    [gateway.errors.__doc__, (ROOT / "docs" / "gateway.md").read_text()],
    ids=["docstring", "docs/gateway.md"],
)
def test_the_documents_list_exactly_the_table(document):
    """Each class of the table is on a line of the document with its status, type and code;
    and the document names no error class the table lacks."""
    for cls, row in ERRORS.items():
        lines = [ln for ln in document.splitlines() if re.search(rf"\b{cls.__name__}\b", ln)]
        assert lines, f"{cls.__name__} is not in the table"
        words = {str(row.status) if isinstance(row.status, int) else "its own", row.type,
                 row.code if isinstance(row.code, str) else ""}  # fmt: skip
        assert any(all(w in ln for w in words) for ln in lines), (cls.__name__, words, lines)
    names = {cls.__name__ for cls in ERRORS}
    rows = [ln for ln in document.splitlines() if re.match(r"(\s{4}|\|)", ln)
            and re.search(r"\s(\d{3}|its own)\s", ln)]  # fmt: skip
    assert len(rows) >= len(set(ERRORS.values())), "the table is missing from the document"
    for row in rows:
        first_column = re.split(r"\s{2,}|\|", row.strip().strip("|"))[0]
        for name in re.findall(
            r"\b[A-Z][a-z]+[A-Z]\w*|\b[A-Z]+[a-z]\w*(?:Error|Exception)", first_column
        ):
            assert name in names, f"{name} is in the document, not in the table"
