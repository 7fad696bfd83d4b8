"""The caller's side of one submitted request, shared by the in-process engine and the remote
client: outputs arrive through `put()` (from the step loop's callback or the socket reader) and
leave through `async for`; closing it early aborts the request.

A choice ends with its event that has a `finish_reason`, "error" included (that request's output
handling failed; the engine serves on). An exception put in the queue (EngineDead) ends the
whole stream by raising.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from engine.outputs import RequestOutput


class OutputStream:
    def __init__(
        self,
        request_id: str,
        n: int,
        abort: Callable[[str], Awaitable[bool]],
        forget: Callable[[str], object],
    ):
        self.request_id = request_id
        self._abort, self._forget = abort, forget
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._open_choices = n  # the stream ends when every choice has finished
        self._closed = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._open_choices > 0:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    self._open_choices -= 1
                yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop listening; an unfinished request is aborted. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._forget(self.request_id)
        if self._open_choices > 0:
            await self._abort(self.request_id)
