"""The engine server: one in-process engine served over TCP (engine.protocol), so gateways in
other processes or on other hosts use it through `engine.client.RemoteEngine`.

Each submitted request gets a task that forwards its outputs to the connection it came from; a
connection that closes aborts every request it still has running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.async_engine import AsyncEngine
from engine.errors import EngineDead, EngineError
from engine.protocol import (
    Abort,
    Accepted,
    Call,
    Failed,
    Output,
    Rejected,
    Reply,
    Submit,
    client_decoder,
    frame,
    read_frame,
    to_wire,
)

log = logging.getLogger(__name__)


class EngineServer:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port (0 picks a free one)."""
        self.engine.start()
        self._server = await asyncio.start_server(self._serve, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.engine.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        tasks: dict[str, asyncio.Task] = {}
        lock = asyncio.Lock()

        async def send(message) -> None:
            async with lock:
                writer.write(frame(message))
                await writer.drain()

        try:
            while True:
                message = client_decoder.decode(await read_frame(reader))
                if isinstance(message, Submit):
                    await self._submit(message, send, tasks)
                elif isinstance(message, Abort):
                    await self.engine.abort(message.request_id)
                elif isinstance(message, Call):
                    await send(await self._call(message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except Exception:
            log.exception("engine server: bad message from %s; closing the connection", peer)
        finally:
            for task in tasks.values():
                task.cancel()  # the stream's aclose aborts its request
            with contextlib.suppress(Exception):
                writer.close()

    async def _submit(self, message: Submit, send, tasks: dict[str, asyncio.Task]) -> None:
        try:
            stream = await self.engine.submit(message.request)
        except (EngineError, EngineDead) as e:
            await send(Rejected(message.call_id, to_wire(e)))
            return
        await send(Accepted(message.call_id))
        rid = message.request.request_id

        async def forward() -> None:
            try:
                async for out in stream:
                    await send(Output(out))
            except ConnectionError:
                pass  # the client is gone; closing the stream (below) aborts the request
            except Exception as e:  # EngineDead: the client's stream raises it too
                if not isinstance(e, EngineDead | EngineError):
                    e = EngineDead(f"engine server: {type(e).__name__}: {e}")
                with contextlib.suppress(ConnectionError):
                    await send(Failed(rid, to_wire(e)))
            finally:
                tasks.pop(rid, None)
                await stream.aclose()  # a no-op once it finished

        tasks[rid] = asyncio.create_task(forward())

    async def _call(self, message: Call) -> Reply:
        if message.method == "info":
            return Reply(message.call_id, info=self.engine.info)
        if message.method == "health":
            return Reply(message.call_id, health=await self.engine.health())
        if message.method == "stats":
            return Reply(message.call_id, stats=await self.engine.stats())
        raise ValueError(f"unknown method {message.method!r}")
