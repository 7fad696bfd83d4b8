"""Several engine servers of one model as one engine (it satisfies `engine.api.EngineClient`).

    submit ─► the healthy replica with the fewest outstanding requests
              (counted from the moment it is chosen until its stream ends)
              a replica that fails (EngineDead) is marked unhealthy and the next one is tried
    health ─► asks every replica; one marked unhealthy rejoins once it answers ok

The gateway's reaper calls `health()` on every pass, so a restarted server comes back without
a request having to find it.
"""

from __future__ import annotations

from engine.client import RemoteEngine
from engine.detokenizer import TokenBytes
from engine.errors import EngineDead
from engine.outputs import EngineInfo, EngineStats, Health
from engine.request import EngineRequest
from gateway.models.errors import ModelUnavailable


class ReplicaSet:
    def __init__(self, replicas: list[RemoteEngine]):
        self.replicas = replicas
        self._outstanding = {id(r): 0 for r in replicas}
        self._healthy = {id(r): True for r in replicas}
        self.info: EngineInfo | None = None  # the first replica's that answered

    async def connect(self) -> ReplicaSet:
        """Connect to every replica; ModelUnavailable if none answers."""
        errors = []
        for r in self.replicas:
            try:
                await r.connect()
                self.info = self.info or r.info
            except EngineDead as e:
                self._healthy[id(r)] = False
                errors.append(str(e))
        if self.info is None:
            raise ModelUnavailable("no engine server answered: " + "; ".join(errors))
        return self

    def outstanding(self) -> dict[str, int]:
        """Requests in flight on each replica, by address."""
        return {r.address: self._outstanding[id(r)] for r in self.replicas}

    def token_bytes(self) -> TokenBytes:
        # every replica serves the same package: the first connected one's table stands for all
        for r in self.replicas:
            if r.info is not None:
                return r.token_bytes()
        raise EngineDead("no engine server replica has connected")

    async def submit(self, request: EngineRequest):
        order = sorted(
            self.replicas,
            key=lambda r: (not self._healthy[id(r)], self._outstanding[id(r)]),
        )
        last: Exception | None = None
        for replica in order:
            key = id(replica)
            # outstanding from the moment it is chosen: requests choosing while this one waits
            # for the server's answer must see it, or a burst all lands on one replica
            self._outstanding[key] += 1
            try:
                stream = await replica.submit(request)
            except BaseException as e:
                self._outstanding[key] -= 1
                if not isinstance(e, EngineDead):
                    raise
                self._healthy[key] = False
                last = e
                continue
            self._healthy[key] = True
            return _Counted(stream, self._outstanding, key)
        raise last or EngineDead("no engine server replica")

    async def abort(self, request_id: str) -> bool:
        found = False
        for r in self.replicas:
            found = await r.abort(request_id) or found
        return found

    async def health(self) -> Health:
        states = []
        for r in self.replicas:
            h = await r.health()
            self._healthy[id(r)] = h.ok
            states.append(f"{r.address}: {h.status}")
        ok = any(self._healthy.values())
        return Health(ok=ok, status="ok" if ok else "dead", detail="; ".join(states))

    async def stats(self) -> EngineStats:
        for r in self.replicas:
            if self._healthy[id(r)]:
                try:
                    return await r.stats()
                except EngineDead:
                    self._healthy[id(r)] = False
        raise EngineDead("no healthy engine server replica")

    async def close(self) -> None:
        for r in self.replicas:
            await r.close()


class _Counted:
    """A stream that counts as outstanding on its replica (from `ReplicaSet.submit`) until it
    ends."""

    def __init__(self, stream, outstanding: dict[int, int], key: int):
        self._stream, self._outstanding, self._key = stream, outstanding, key
        self.request_id = stream.request_id
        self._done = False

    async def __aiter__(self):
        try:
            async for out in self._stream:
                yield out
        finally:
            self._finish()

    async def aclose(self) -> None:
        self._finish()
        await self._stream.aclose()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._outstanding[self._key] -= 1


def host_port(address: str) -> tuple[str, int]:
    """ "HOST:PORT" → (host, port); ValueError naming the address otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"engine server address {address!r} must be HOST:PORT")
    return host, int(port)
