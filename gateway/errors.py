"""One closed set of errors and one status table (STYLE.md): every exception a request can meet
becomes an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}` here, and
nowhere else. `ERRORS` below is the table; an exception maps through the first class of its MRO
that has a row, so a subclass answers as its base unless it has a row of its own.

    error                                   status  type                   code                      param
    msgspec.ValidationError                 400     invalid_request_error  invalid_value             the field msgspec names
    msgspec.DecodeError                     400     invalid_request_error  invalid_json              -
    litestar ValidationException            400     invalid_request_error  invalid_value             the field litestar names
    InvalidParameter                        400     invalid_request_error  its own (or null)         its own
    ContextOverflow                         400     invalid_request_error  context_length_exceeded   max_tokens
    InvalidRequest                          400     invalid_request_error  invalid_value             max_tokens
    TemplateRaised, NoChatTemplate          400     invalid_request_error  chat_template             messages
    TooLargeForLimit                        400     invalid_request_error  tokens_exceed_limit       max_tokens
    controlplane InvalidInput               400     invalid_request_error  invalid_value             its own
    MissingKey, InvalidKey                  401     invalid_request_error  invalid_api_key           -
    controlplane Unauthenticated            401     invalid_request_error  unauthenticated           -
    PermissionDenied                        403     permission_error       missing_scope             -
    controlplane Forbidden                  403     permission_error       forbidden                 -
    controlplane NotFound                   404     invalid_request_error  not_found                 its own
    controlplane Conflict                   409     invalid_request_error  conflict                  its own
    controlplane TooLarge                   413     invalid_request_error  too_large                 its own
    registry GateFailed (promotion refused) 422     invalid_request_error  gate_failed               version
    controlplane QuotaExceeded              429     rate_limit_error       quota_exceeded            -  (+Retry-After)
    ModelNotFound                           404     invalid_request_error  model_not_found           model
    litestar NotFoundException (route)      404     invalid_request_error  not_found                 -
    litestar MethodNotAllowedException      405     invalid_request_error  method_not_allowed        -  (+Allow)
    litestar RequestEntityTooLarge          413     invalid_request_error  body_too_large            -
    litestar HTTPException (any other)      its own invalid_request_error  null                      -  (+its headers)
    RateLimited                             429     rate_limit_error       rate_limit_exceeded       -  (+Retry-After, x-ratelimit-*)
    ClientDisconnected (hung up, no answer) 499     invalid_request_error  client_disconnected       -
    ChatTemplateError (the template broke)  500     server_error           chat_template             -  (logged)
    OutputFailed (one request's output)    500     server_error           output_failed             -  (logged)
    Overloaded (engine queue full)          503     server_error           overloaded                -  (+Retry-After)
    ModelLoading (load outlasted the wait)  503     server_error           model_loading             -  (+Retry-After)
    ModelUnavailable                        503     server_error           engine_unavailable        -  (+Retry-After when it has one)
    ModelLoadFailed (corrupt files, …)      503     server_error           model_load_failed         -  (+Retry-After, logged)
    EngineDead                              503     server_error           engine_unavailable        -
    LimiterUnavailable                      503     server_error           limiter_unavailable       -
    anything else                           500     server_error           internal_error            -  (logged with its traceback)

The error classes live beside what raises them (engine/errors.py, controlplane/errors.py,
controlplane/keys.py, gateway/auth/errors.py,
gateway/limits/errors.py, gateway/models/errors.py, gateway/openai/errors.py,
gateway/openai/chat_template.py), and none of those imports this module. `error_responses`
documents a route's error statuses in OpenAPI from this same table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from operator import attrgetter
from typing import Any

import msgspec
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec

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
from engine.errors import ContextOverflow, EngineDead, InvalidRequest, Overloaded
from gateway.auth.errors import MissingKey, PermissionDenied
from gateway.limits.errors import LimiterUnavailable, RateLimited, TooLargeForLimit
from gateway.models.errors import ModelLoadFailed, ModelLoading, ModelNotFound, ModelUnavailable
from gateway.openai.chat_template import ChatTemplateError, NoChatTemplate, TemplateRaised
from gateway.openai.errors import (
    ClientDisconnected,
    InvalidParameter,
    OutputFailed,
    param_from_validation_error,
)
from gateway.openai.schemas import ErrorBody, ErrorResponse
from registry.errors import GateFailed

log = logging.getLogger(__name__)


# ── the table ──

Rule = Callable[[Any], Any]  # reads a value off the exception being answered


@dataclass(frozen=True)
class ErrorRow:
    """How one exception type answers. `status`, `code` and `param` are a constant or a rule
    that reads the exception; `message` and `headers` are rules."""

    status: int | Rule
    type: str
    code: str | None | Rule
    param: str | None | Rule = None
    message: Rule = str
    headers: Rule = lambda exc: {}
    log: bool = False  # a fault on our side: the client sees the message, the log sees it too


def _retry_after(exc: Any) -> dict[str, str]:
    seconds = exc.retry_after_s
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def _until_reset(exc: QuotaExceeded) -> dict[str, str]:
    seconds = (exc.resets_at - datetime.now(UTC)).total_seconds()
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _http_headers(exc: HTTPException) -> dict[str, str]:
    return dict(exc.headers or {})


def _litestar_problem(exc: ValidationException) -> tuple[str | None, str]:
    """(param, message) of litestar's own validation error: its `extra` holds a list of
    {"key", "message"}; the key is the path of the value at fault ("data" for the body itself),
    which for an unknown or missing field is the parent object, and the message names the
    field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    message, key = first.get("message", exc.detail), first.get("key")
    if key == "data" and message == "'data'":
        # no body at all: litestar names the missing handler argument, nothing more
        message = "the request has no body; send the request as a JSON object"
    parent = key if key != "data" else None
    field = param_from_validation_error(str(message))
    param = ".".join(p for p in (parent, field) if p) or None
    return param, f"{param}: {message}" if param else str(message)


INVALID, SERVER = "invalid_request_error", "server_error"
_DETAIL: Rule = attrgetter("detail")
_TEMPLATE_REFUSED = ErrorRow(400, INVALID, "chat_template", "messages")
_BAD_KEY = ErrorRow(401, INVALID, "invalid_api_key")
_PARAM: Rule = attrgetter("param")

ERRORS: dict[type[BaseException], ErrorRow] = {
    # 400: the request, as sent, can never succeed
    msgspec.ValidationError: ErrorRow(400, INVALID, "invalid_value", param_from_validation_error),
    msgspec.DecodeError: ErrorRow(
        400, INVALID, "invalid_json", message=lambda e: f"the body is not valid JSON: {e}"
    ),
    ValidationException: ErrorRow(
        400,
        INVALID,
        "invalid_value",
        param=lambda e: _litestar_problem(e)[0],
        message=lambda e: _litestar_problem(e)[1],
    ),
    InvalidParameter: ErrorRow(400, INVALID, attrgetter("code"), attrgetter("param")),
    ContextOverflow: ErrorRow(400, INVALID, "context_length_exceeded", "max_tokens"),
    InvalidRequest: ErrorRow(400, INVALID, "invalid_value", "max_tokens"),
    TemplateRaised: _TEMPLATE_REFUSED,
    NoChatTemplate: _TEMPLATE_REFUSED,
    TooLargeForLimit: ErrorRow(400, INVALID, "tokens_exceed_limit", "max_tokens"),
    InvalidInput: ErrorRow(400, INVALID, "invalid_value", _PARAM),
    # 401, 403: credentials
    MissingKey: _BAD_KEY,
    InvalidKey: _BAD_KEY,
    Unauthenticated: ErrorRow(401, INVALID, "unauthenticated"),
    PermissionDenied: ErrorRow(403, "permission_error", "missing_scope"),
    Forbidden: ErrorRow(403, "permission_error", "forbidden"),
    # 404, 405, 413: what was asked for is not here
    ModelNotFound: ErrorRow(404, INVALID, "model_not_found", "model"),
    NotFound: ErrorRow(404, INVALID, "not_found", _PARAM),
    Conflict: ErrorRow(409, INVALID, "conflict", _PARAM),
    TooLarge: ErrorRow(413, INVALID, "too_large", _PARAM),
    # the version's reports do not meet the alias's gates: the message names each failed gate
    GateFailed: ErrorRow(422, INVALID, "gate_failed", "version"),
    NotFoundException: ErrorRow(404, INVALID, "not_found", message=_DETAIL),
    MethodNotAllowedException: ErrorRow(
        405, INVALID, "method_not_allowed", message=_DETAIL, headers=_http_headers
    ),
    RequestEntityTooLarge: ErrorRow(413, INVALID, "body_too_large", message=_DETAIL),
    HTTPException: ErrorRow(
        attrgetter("status_code"), INVALID, None, message=_DETAIL, headers=_http_headers
    ),
    # 429, 499: the same request may succeed later
    RateLimited: ErrorRow(
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        headers=lambda e: _retry_after(e) | e.headers,
    ),
    QuotaExceeded: ErrorRow(429, "rate_limit_error", "quota_exceeded", headers=_until_reset),
    ClientDisconnected: ErrorRow(499, INVALID, "client_disconnected"),
    # 500, 503: our side
    ChatTemplateError: ErrorRow(500, SERVER, "chat_template", log=True),
    # the engine's message may name its internals: the log gets it, the client the request id
    OutputFailed: ErrorRow(500, SERVER, "output_failed", message=attrgetter("public"), log=True),
    Overloaded: ErrorRow(503, SERVER, "overloaded", headers=_retry_after),
    ModelLoading: ErrorRow(503, SERVER, "model_loading", headers=_retry_after),
    ModelUnavailable: ErrorRow(503, SERVER, "engine_unavailable", headers=_retry_after),
    ModelLoadFailed: ErrorRow(503, SERVER, "model_load_failed", headers=_retry_after),
    EngineDead: ErrorRow(503, SERVER, "engine_unavailable"),
    LimiterUnavailable: ErrorRow(503, SERVER, "limiter_unavailable"),
}

# anything without a row is a bug: the client learns only that, the log gets the traceback
INTERNAL = ErrorRow(
    500, SERVER, "internal_error", message=lambda e: "internal error; see the gateway's log"
)


def row_for(exc: BaseException) -> ErrorRow | None:
    """The row of the first class in `exc`'s MRO that has one; None for a bug."""
    for cls in type(exc).__mro__:
        if (row := ERRORS.get(cls)) is not None:
            return row
    return None


def _read(value: Any, exc: BaseException) -> Any:
    return value(exc) if callable(value) else value


def classify(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI error body, extra headers) for any exception a request raised."""
    row = row_for(exc)
    if row is None:
        log.exception("unhandled error", exc_info=exc)
        row = INTERNAL
    elif row.log:
        log.error("%s: %s", row.code, exc)
    param, code = _read(row.param, exc), _read(row.code, exc)
    error = ErrorBody(message=row.message(exc), type=row.type, param=param, code=code)
    return _read(row.status, exc), msgspec.to_builtins(ErrorResponse(error)), row.headers(exc)


# ── OpenAPI: the same table, as each route's documented error responses ──


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` for a route handler that can answer these statuses: each is OpenAI's error
    body, described by the codes the table gives that status."""
    return {status: _spec(status) for status in statuses}


def _spec(status: int) -> ResponseSpec:
    rows = [*ERRORS.values(), INTERNAL]
    codes = sorted({r.code for r in rows if r.status == status and isinstance(r.code, str)})
    described = f"{HTTPStatus(status).phrase}; error.code is one of: {', '.join(codes)}"
    return ResponseSpec(ErrorResponse, description=described, generate_examples=False)
