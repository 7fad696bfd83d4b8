"""The engine server's wire format: length-prefixed msgpack frames of tagged msgspec Structs.

    frame  = u32 big-endian length ‖ msgpack(message)
    client → server   Submit | Abort | Call
    server → client   Accepted | Rejected | Output | Failed | Reply

One connection multiplexes every request of a client; each call carries a `call_id` the reply
echoes. Requests a connection submitted are aborted when it closes (an abandoned client never
holds slots). Structs are array_like with a tag, so a message costs a few bytes over its fields,
and new fields go last with defaults.

Errors cross as values: one tagged Struct per engine error (`WireError`), made by `to_wire` and
turned back into the same exception type with the same fields by `from_wire`. A submit the engine
refuses is answered `Rejected`; a stream the engine can no longer serve (EngineDead) ends with
`Failed`. One request whose output handling failed is not an exception: its stream's last event
has finish_reason "error", an ordinary `Output`.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from engine.errors import ContextOverflow, EngineDead, EngineError, InvalidRequest, Overloaded
from engine.outputs import EngineInfo, EngineStats, Health, RequestOutput
from engine.request import EngineRequest

MAX_FRAME = 64 * 1024 * 1024  # an EngineInfo carries the tokenizer (a few MB); nothing is bigger
_LEN = struct.Struct(">I")


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, tag=True, gc=False):
    pass


# ── errors ──


class WireOverloaded(_Msg, tag="overloaded"):
    queue_depth: int
    max_waiting: int
    retry_after_s: float


class WireContextOverflow(_Msg, tag="context_overflow"):
    prompt_tokens: int
    max_tokens: int
    max_len: int


class WireInvalidRequest(_Msg, tag="invalid_request"):
    message: str


class WireEngineError(_Msg, tag="engine_error"):
    """A per-request engine error of a type this table does not name (a newer server's)."""

    message: str


class WireEngineDead(_Msg, tag="engine_dead"):
    message: str


WireError = (
    WireOverloaded | WireContextOverflow | WireInvalidRequest | WireEngineError | WireEngineDead
)

# exception type ↔ its wire form. Each wire form's fields are its exception's constructor
# arguments, in order: the attribute of that name, or `message`, the exception's text.
_WIRE: dict[type[EngineError | EngineDead], type[WireError]] = {
    Overloaded: WireOverloaded,
    ContextOverflow: WireContextOverflow,
    InvalidRequest: WireInvalidRequest,
    EngineError: WireEngineError,
    EngineDead: WireEngineDead,
}
_FROM_WIRE = {wire: exc for exc, wire in _WIRE.items()}


def to_wire(error: EngineError | EngineDead) -> WireError:
    """A subclass not listed takes its nearest listed base's form."""
    for cls in type(error).__mro__:
        wire = _WIRE.get(cls)
        if wire is not None:
            fields = wire.__struct_fields__
            return wire(*(str(error) if f == "message" else getattr(error, f) for f in fields))
    raise TypeError(f"{type(error).__name__} is not an engine error; it cannot cross the wire")


def from_wire(error: WireError) -> EngineError | EngineDead:
    """The exception `to_wire` was given: the same type, fields and message."""
    return _FROM_WIRE[type(error)](*msgspec.structs.astuple(error))


# ── messages ──


class Submit(_Msg, tag="submit"):
    call_id: int
    request: EngineRequest


class Abort(_Msg, tag="abort"):
    request_id: str


class Call(_Msg, tag="call"):
    call_id: int
    method: str  # "info", "health" or "stats"


class Accepted(_Msg, tag="accepted"):
    call_id: int


class Rejected(_Msg, tag="rejected"):
    """The engine refused a Submit: Overloaded, ContextOverflow, InvalidRequest, EngineDead."""

    call_id: int
    error: WireError


class Output(_Msg, tag="output"):
    output: RequestOutput


class Failed(_Msg, tag="failed"):
    """The stream of `request_id` ends with this error (the engine died under it)."""

    request_id: str
    error: WireError


class Reply(_Msg, tag="reply"):
    call_id: int
    info: EngineInfo | None = None
    health: Health | None = None
    stats: EngineStats | None = None


ClientMessage = Submit | Abort | Call
ServerMessage = Accepted | Rejected | Output | Failed | Reply

_encoder = msgspec.msgpack.Encoder()
client_decoder = msgspec.msgpack.Decoder(ClientMessage)
server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; IncompleteReadError at a clean end of stream."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
    return await reader.readexactly(n)
