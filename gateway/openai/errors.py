"""The OpenAI API's own request errors. Nothing here imports the gateway: `gateway/errors.py`
imports these into the status table, so raising them never pulls the table in."""

from __future__ import annotations

import re

import msgspec


class InvalidParameter(ValueError):
    """A request field this server refuses: HTTP 400, `invalid_request_error`."""

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault, as OpenAI's error `param`
        self.message = message
        self.code = code  # OpenAI's error `code`, e.g. "context_length_exceeded"


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready; its generation was aborted. Nobody reads
    the answer: 499 (nginx's "client closed request") is for the access log and metrics."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")


class OutputFailed(RuntimeError):
    """The engine could not produce this request's output (its output handling raised): the
    request ended alone, with an "error" event, and the engine serves on. A fault on our side:
    the client gets a 500 (or an error event mid-stream) naming the request, and the log gets
    the engine's message, which may name its internals."""

    def __init__(self, model: str, request_id: str, error: str | None):
        super().__init__(f"{model} failed to produce the output of request {request_id}: {error}")
        self.public = (
            f"the model failed to produce the output of request {request_id}; see the gateway's log"
        )


_FIELD_ERROR = re.compile(r"(?:unknown|missing required) field `([^`]+)`(?: - at `\$\.?([^`]*)`)?")
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`")


def param_from_validation_error(err: msgspec.ValidationError | str) -> str | None:
    """The field a msgspec decode error (or its message) points at, in OpenAI's `param`
    style, or None:

    "Expected `float` <= 2.0 - at `$.temperature`"  -> "temperature"
    "Expected `str` - at `$.messages[0].role`"       -> "messages[0].role"
    "Object contains unknown field `temprature`"     -> "temprature"
    "Object missing required field `model`"          -> "model"
    """
    text = str(err)
    if m := _FIELD_ERROR.search(text):
        return f"{m[2]}.{m[1]}" if m[2] else m[1]
    if m := _AT_PATH.search(text):
        return m[1] or None
    return None
