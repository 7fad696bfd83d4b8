"""The engine server's wire format: length-prefixed msgpack frames of tagged msgspec Structs.

    frame  = u32 big-endian length ‖ msgpack(message)
    client → server   Submit | Abort | Call
    server → client   Accepted | Rejected | Output | Reply

One connection multiplexes every request of a client; each call carries a `call_id` the reply
echoes. Requests a connection submitted are aborted when it closes (an abandoned client never
holds slots). Structs are array_like with a tag, so a message costs a few bytes over its fields,
and new fields go last with defaults.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from engine.outputs import EngineInfo, EngineStats, Health, RequestOutput
from engine.request import EngineRequest

MAX_FRAME = 64 * 1024 * 1024  # an EngineInfo carries the tokenizer (a few MB); nothing is bigger
_LEN = struct.Struct(">I")


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, tag=True, gc=False):
    pass


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
    call_id: int
    kind: str  # the engine error's class name: Overloaded, ContextOverflow, InvalidRequest, ...
    message: str
    retry_after_s: float | None = None
    prompt_tokens: int | None = None  # ContextOverflow's numbers
    max_tokens: int | None = None
    max_len: int | None = None
    queue_depth: int | None = None  # Overloaded's numbers
    max_waiting: int | None = None


class Output(_Msg, tag="output"):
    output: RequestOutput


class Reply(_Msg, tag="reply"):
    call_id: int
    info: EngineInfo | None = None
    health: Health | None = None
    stats: EngineStats | None = None


ClientMessage = Submit | Abort | Call
ServerMessage = Accepted | Rejected | Output | Reply

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
