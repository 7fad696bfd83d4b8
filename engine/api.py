"""Contract 4, the engine API, as one Protocol: the in-process engine (`engine.async_engine`) and
the client of a remote engine server (`engine.client`) both satisfy it, so the gateway cannot
tell them apart.

    stream = await engine.submit(request)   # raises Overloaded / ContextOverflow / InvalidRequest
    async for out in stream:                # RequestOutput events; the last has finish_reason
        ...
    await stream.aclose()                   # before the end: aborts the request (frees its slot)

`submit` checks admission before it returns, so a caller learns "overloaded" or "too long"
before it has sent a byte of response. Iterating raises `EngineDead` if the engine dies; a
request whose output handling failed ends alone, its last event's finish_reason "error".

What a caller needs to know about an engine comes through here, never through its internals:
`info` (what it serves, `info.kv_bytes` the memory its KV cache holds) and `token_bytes()` (its
token id → bytes table, for rendering logprobs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from engine.detokenizer import TokenBytes
from engine.outputs import EngineInfo, EngineStats, Health, RequestOutput
from engine.request import EngineRequest


@runtime_checkable
class RequestStream(Protocol):
    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def aclose(self) -> None:
        """Stop listening; an unfinished request is aborted."""
        ...


@runtime_checkable
class EngineClient(Protocol):
    info: EngineInfo

    async def submit(self, request: EngineRequest) -> RequestStream: ...

    def token_bytes(self) -> TokenBytes:
        """The engine's token table (built once; a remote engine's after connect())."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    async def health(self) -> Health: ...

    async def stats(self) -> EngineStats: ...

    async def close(self) -> None:
        """Stop the engine (in-process) or the connection (remote); streams end with EngineDead."""
        ...
