"""The engine server's wire format: errors cross as typed values and come back as the same
exception type with the same fields and message."""

from __future__ import annotations

import pytest

from engine.errors import ContextOverflow, EngineDead, EngineError, InvalidRequest, Overloaded
from engine.outputs import RequestOutput
from engine.protocol import (
    Failed,
    Output,
    Rejected,
    WireEngineError,
    frame,
    from_wire,
    server_decoder,
    to_wire,
)

ERRORS = [
    Overloaded(queue_depth=7, max_waiting=8, retry_after_s=2.5),
    ContextOverflow(prompt_tokens=100, max_tokens=50, max_len=128),
    InvalidRequest("request id 'a' is already in the engine"),
    EngineError("a per-request failure of no finer type"),
    EngineDead("engine for tiny failed: RuntimeError: device lost"),
]


def over_the_wire(message):
    """`message` framed, as the server writes it, and decoded, as the client reads it."""
    data = frame(message)
    return server_decoder.decode(data[4:])


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_a_rejection_raises_the_same_error_on_the_client(error):
    got = from_wire(over_the_wire(Rejected(call_id=41, error=to_wire(error))).error)
    assert type(got) is type(error)
    assert vars(got) == vars(error) and str(got) == str(error)


def test_a_stream_failure_crosses_as_a_typed_error():
    dead = EngineDead("engine server: connection reset")
    got = over_the_wire(Failed(request_id="r1", error=to_wire(dead)))
    assert got.request_id == "r1"
    error = from_wire(got.error)
    assert isinstance(error, EngineDead) and str(error) == str(dead)


def test_a_failed_request_is_an_ordinary_output_event():
    """One request's failed output handling is data on its stream, not an exception."""
    out = RequestOutput(request_id="r1", finish_reason="error", error="output handling failed")
    assert over_the_wire(Output(out)).output == out


def test_an_engine_error_subclass_crosses_as_its_nearest_known_base():
    class Throttled(EngineError):
        pass

    wire = to_wire(Throttled("slow down"))
    assert isinstance(wire, WireEngineError)
    got = from_wire(over_the_wire(Rejected(call_id=1, error=wire)).error)
    assert type(got) is EngineError and str(got) == "slow down"


def test_only_engine_errors_cross():
    with pytest.raises(TypeError, match="ValueError is not an engine error"):
        to_wire(ValueError("x"))
