"""One closed set of errors and one status table (STYLE.md): every exception a request can meet
becomes an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}` here, and
nowhere else.

    error                                    status  type                    code
    msgspec.ValidationError / DecodeError    400     invalid_request_error   invalid_value
    InvalidParameter                         400     invalid_request_error   (its own)
    ContextOverflow, InvalidRequest          400     invalid_request_error   context_length_exceeded
    TemplateRaised, NoChatTemplate           400     invalid_request_error   chat_template
    RateRefusedForever (too large for tpm)   400     invalid_request_error   tokens_exceed_limit
    MissingKey, InvalidKey                   401     invalid_request_error   invalid_api_key
    PermissionDenied                         403     permission_error        missing_scope
    ModelNotFound                            404     invalid_request_error   model_not_found
    RateLimited                              429     rate_limit_error        rate_limit_exceeded
    Overloaded (engine queue full)           503     server_error            overloaded (+Retry-After)
    ModelLoading (load outlasted the wait)   503     server_error            model_loading (+Retry-After)
    ModelUnavailable, EngineDead             503     server_error            engine_unavailable
    LimiterUnavailable                       503     server_error            limiter_unavailable
    ClientDisconnected (hung up, no answer)  499     invalid_request_error   client_disconnected
    anything else                            500     server_error            internal_error (logged)

Litestar's own HTTP errors (404 route, 405, 413 body too large) get the same shape.
"""

from __future__ import annotations

import logging
import math

import msgspec

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    param: str | None = None
    retry_after_s: float | None = None


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"
    param = "model"

    def __init__(self, model: str, detail: str):
        self.model = model
        super().__init__(f"the model {model!r} does not exist or cannot be served: {detail}")


class ModelLoading(GatewayError):
    status, type, code = 503, "server_error", "model_loading"

    def __init__(self, ref: str, waited_s: float):
        self.retry_after_s = max(1.0, waited_s / 2)
        super().__init__(
            f"{ref} is still loading after {waited_s:g} s; retry after "
            f"{math.ceil(self.retry_after_s)} s"
        )


class ModelUnavailable(GatewayError):
    status, type, code = 503, "server_error", "engine_unavailable"

    def __init__(self, message: str, retry_after_s: float | None = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str]):
        self.retry_after_s, self.headers = retry_after_s, headers
        super().__init__(message)


class TooLargeForLimit(GatewayError):
    status, type, code = 400, "invalid_request_error", "tokens_exceed_limit"
    param = "max_tokens"


class ClientDisconnected(GatewayError):
    """The client hung up before its answer was ready; its generation was aborted. Nobody reads
    the answer: 499 (nginx's "client closed request") is for the access log and metrics."""

    status, type, code = 499, "invalid_request_error", "client_disconnected"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")


def classify(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, body, extra headers) for any exception a request raised."""
    from engine.errors import ContextOverflow, EngineDead, InvalidRequest, Overloaded
    from gateway.auth.errors import InvalidKey, MissingKey, PermissionDenied
    from gateway.limits.errors import LimiterUnavailable
    from gateway.openai.chat_template import ChatTemplateError, NoChatTemplate, TemplateRaised
    from gateway.openai.validation import InvalidParameter, param_from_validation_error

    headers: dict[str, str] = {}
    if isinstance(exc, GatewayError):
        if exc.retry_after_s is not None and exc.status in (429, 503):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        headers.update(getattr(exc, "headers", {}))
        return exc.status, body(str(exc), exc.type, exc.param, exc.code), headers
    if isinstance(exc, msgspec.ValidationError):
        param = param_from_validation_error(exc)
        return 400, body(str(exc), "invalid_request_error", param, "invalid_value"), headers
    if isinstance(exc, msgspec.DecodeError):
        msg = f"the body is not valid JSON: {exc}"
        return 400, body(msg, "invalid_request_error", None, "invalid_json"), headers
    if isinstance(exc, InvalidParameter):
        return 400, body(str(exc), "invalid_request_error", exc.param, exc.code), headers
    if isinstance(exc, ContextOverflow | InvalidRequest):
        code = "context_length_exceeded" if isinstance(exc, ContextOverflow) else "invalid_value"
        return 400, body(str(exc), "invalid_request_error", "max_tokens", code), headers
    if isinstance(exc, TemplateRaised | NoChatTemplate):
        return 400, body(str(exc), "invalid_request_error", "messages", "chat_template"), headers
    if isinstance(exc, MissingKey | InvalidKey):
        return 401, body(str(exc), "invalid_request_error", None, "invalid_api_key"), headers
    if isinstance(exc, PermissionDenied):
        return 403, body(str(exc), "permission_error", None, "missing_scope"), headers
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return 503, body(str(exc), "server_error", None, "overloaded"), headers
    if isinstance(exc, EngineDead):
        return 503, body(str(exc), "server_error", None, "engine_unavailable"), headers
    if isinstance(exc, LimiterUnavailable):
        return 503, body(str(exc), "server_error", None, "limiter_unavailable"), headers
    if isinstance(exc, ChatTemplateError):
        log.error("chat template failed: %s", exc)
        return 500, body(str(exc), "server_error", None, "chat_template"), headers
    log.exception("unhandled error", exc_info=exc)
    return 500, body("internal error; see the gateway's log", "server_error", None,
                     "internal_error"), headers  # fmt: skip


def body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
