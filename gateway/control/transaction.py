"""One control-plane service call in its own transaction, in a worker thread: the services are
synchronous (SQLAlchemy), and the event loop must not wait on the database.

Handlers are `async def` and call this, rather than being sync handlers with
`sync_to_thread=True`: Litestar 2.25 wraps such a handler once more each time another handler
is registered on the same path, and the twice-wrapped one answers a coroutine (a 500).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from controlplane.db import Database

T = TypeVar("T")


async def in_transaction(db: Database, service: Callable[..., T], *args: Any, **kw: Any) -> T:
    """`service(session, *args, **kw)`, committed if it returns, rolled back if it raises."""

    def run() -> T:
        with db.session() as s:
            return service(s, *args, **kw)

    return await asyncio.to_thread(run)
