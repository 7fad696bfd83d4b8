"""`RemoteEngine`: the engine API (engine.api.EngineClient) over a socket to an engine server.

One connection, a reader task that routes frames: replies to the futures of their calls, outputs
to the queues of their streams. If the connection drops, every open stream ends with EngineDead
and health() says so; the next call reconnects (a restarted server is picked up).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from engine.detokenizer import TokenBytes
from engine.errors import EngineDead
from engine.outputs import EngineInfo, EngineStats, Health
from engine.protocol import (
    Abort,
    Accepted,
    Call,
    Failed,
    Output,
    Rejected,
    Reply,
    Submit,
    frame,
    from_wire,
    read_frame,
    server_decoder,
)
from engine.request import EngineRequest
from engine.stream import OutputStream


class RemoteEngine:
    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 5.0):
        self.host, self.port, self.connect_timeout_s = host, port, connect_timeout_s
        self.info: EngineInfo | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[str, OutputStream] = {}
        self._ids = itertools.count()
        self._connect_lock = asyncio.Lock()
        self._lost: str | None = None  # why the last connection ended
        self._token_bytes: TokenBytes | None = None  # built from info on first use

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self) -> RemoteEngine:
        """Connect (if not connected) and fetch the engine's info; EngineDead if unreachable."""
        async with self._connect_lock:
            if self._writer is not None:
                return self
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.connect_timeout_s
                )
            except (OSError, TimeoutError) as e:
                raise EngineDead(f"engine server {self.address} unreachable: {e}") from None
            self._lost = None
            self._reader_task = asyncio.create_task(self._read())
        reply = await self._call("info")
        if self.info is None or reply.info.tokenizer_json != self.info.tokenizer_json:
            self._token_bytes = None  # a restarted server may serve another tokenizer
        self.info = reply.info
        return self

    def token_bytes(self) -> TokenBytes:
        """The engine's token table, built once from its info's tokenizer (after connect())."""
        if self._token_bytes is None:
            if self.info is None:
                raise RuntimeError(f"engine server {self.address}: token_bytes() before connect()")
            self._token_bytes = TokenBytes(self.info.tokenizer_json)
        return self._token_bytes

    async def submit(self, request: EngineRequest) -> OutputStream:
        await self.connect()
        call_id = next(self._ids)
        stream = OutputStream(
            request.request_id,
            request.sampling.n,
            self.abort,
            lambda rid: self._streams.pop(rid, None),
        )
        self._streams[request.request_id] = stream
        reply = await self._send_and_wait(call_id, Submit(call_id, request))
        if isinstance(reply, Rejected):
            self._streams.pop(request.request_id, None)
            raise from_wire(reply.error)
        return stream

    async def abort(self, request_id: str) -> bool:
        if self._writer is None:
            return False
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.write(frame(Abort(request_id)))
            await self._writer.drain()
        return True

    async def health(self) -> Health:
        try:
            await self.connect()
            return (await self._call("health")).health
        except EngineDead as e:
            return Health(ok=False, status="dead", detail=str(e))

    async def stats(self) -> EngineStats:
        await self.connect()
        return (await self._call("stats")).stats

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._lose("the client closed the connection")

    # ── internals ──

    async def _call(self, method: str) -> Reply:
        call_id = next(self._ids)
        return await self._send_and_wait(call_id, Call(call_id, method))

    async def _send_and_wait(self, call_id: int, message) -> Reply | Accepted | Rejected:
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._writer.write(frame(message))
            await self._writer.drain()
        except (ConnectionError, AttributeError) as e:
            self._calls.pop(call_id, None)
            self._lose(f"send failed: {e}")
            raise EngineDead(f"engine server {self.address}: connection lost") from None
        return await future

    async def _read(self) -> None:
        why = "the engine server closed the connection"
        try:
            while True:
                message = server_decoder.decode(await read_frame(self._reader))
                if isinstance(message, Output):
                    stream = self._streams.get(message.output.request_id)
                    if stream is not None:
                        stream.put(message.output)
                elif isinstance(message, Failed):
                    stream = self._streams.pop(message.request_id, None)
                    if stream is not None:
                        stream.put(from_wire(message.error))
                else:
                    future = self._calls.pop(message.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            why = f"connection lost ({type(e).__name__})"
        except Exception as e:  # a frame we cannot read: the peer is not a compatible server
            why = f"unreadable message: {e}"
        finally:
            self._lose(why)

    def _lose(self, why: str) -> None:
        """The connection is gone: fail every call and stream, forget the connection."""
        self._lost = why
        self._writer = self._reader = None
        dead = EngineDead(f"engine server {self.address}: {why}")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(dead)
        self._calls.clear()
        for stream in self._streams.values():
            stream.put(dead)
        self._streams.clear()
