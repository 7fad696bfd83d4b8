"""Loaded model versions and their lifecycle: load on first use, one load shared by every
request waiting for it, leases for requests in flight, unload when idle, drain after an alias
moved away, evict under the memory budget.

    acquire(name, version) ─► loaded ─► Lease (in_flight + 1) … release() (last_used = now)
                              │ not loaded: one load task per version, shared; each request
                              │ waits up to load_wait_s for it, then ModelLoading (503)
                              ▼
              loader.load(name, version, make_room) → engine, the memory it holds

    make_room(bytes)  the least recently used idle deployments unload until `bytes` more fit the
                      memory budget; one serving a request is never evicted (503 instead)
    unload_idle()     drained retired versions, and versions idle for idle_unload_s, unload
                      (scale to zero)

Time is the injected clock's: last_used, idle unload and eviction order follow it, so tests
advance a fake clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Tokenizer

from engine.api import EngineClient
from engine.detokenizer import TokenBytes
from engine.outputs import EngineInfo
from gateway.clock import Clock
from gateway.models.errors import ModelLoadFailed, ModelLoading, ModelUnavailable

log = logging.getLogger(__name__)

MakeRoom = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Loaded:
    """A started engine and what it costs this process."""

    engine: EngineClient
    bytes: int  # weights + KV cache held in this process; 0 for engines that run elsewhere
    remote: bool  # engine servers: not counted in the budget, never evicted or reloaded here


class Loader(Protocol):
    """Where engines come from (`gateway.models.loader.RegistryLoader`; tests pass fakes)."""

    async def load(self, name: str, version: int, make_room: MakeRoom) -> Loaded:
        """Start an engine of `name:version`; await `make_room(bytes)` before taking memory here
        (it raises ModelUnavailable when the budget cannot make room)."""
        ...


@dataclass(eq=False)
class Deployment:
    """One version, ready to serve: its engine and what requests need to talk to it."""

    name: str
    version: int
    engine: EngineClient
    info: EngineInfo
    tokenizer: Tokenizer
    token_bytes: TokenBytes  # token id → its bytes (logprobs' token strings and bytes)
    bytes: int  # weights + KV cache, for the memory budget
    remote: bool
    load_s: float
    last_used: float  # clock seconds when it was loaded or its last request ended
    in_flight: int = 0
    retired: bool = False  # no route names it any more: unload once drained

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class Lease:
    """A deployment held for one request; `release()` (or `async with`) returns it."""

    def __init__(self, deployment: Deployment, cold_start: bool, clock: Clock):
        self.deployment, self.cold_start = deployment, cold_start
        self._clock = clock
        self._released = False
        deployment.in_flight += 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.deployment.in_flight -= 1
            self.deployment.last_used = self._clock()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class Deployments:
    def __init__(
        self,
        loader: Loader,
        *,
        clock: Clock,
        memory_budget_bytes: int = 0,  # 0: no limit
        load_wait_s: float = 60.0,
        idle_unload_s: float = 0.0,  # 0: never
        on_load: Callable[[Deployment], None] | None = None,
        on_unload: Callable[[Deployment], None] | None = None,
    ):
        self._loader, self._clock = loader, clock
        self._budget, self._load_wait_s = memory_budget_bytes, load_wait_s
        self._idle_unload_s = idle_unload_s
        self._on_load, self._on_unload = on_load, on_unload
        self._loaded: dict[tuple[str, int], Deployment] = {}
        self._loads: dict[tuple[str, int], asyncio.Task[Deployment]] = {}

    @property
    def loaded(self) -> list[Deployment]:
        return list(self._loaded.values())

    @property
    def loading(self) -> bool:
        return bool(self._loads)

    async def acquire(self, name: str, version: int) -> Lease:
        """A lease on `name:version`, loaded first if needed (ModelLoading if the load takes
        longer than load_wait_s; it goes on for the requests after)."""
        key = (name, version)
        deployment = self._loaded.get(key)
        if deployment is not None and not deployment.remote:
            health = await deployment.engine.health()
            if health.status == "dead":
                # its runtime failed and it never serves again; busy, it would never go idle
                # long enough to be reaped: replace it now (a remote one reconnects by itself)
                log.error("%s: the engine is dead (%s); loading it again", deployment.ref,
                          health.detail)  # fmt: skip
                await self._unload(deployment)
                deployment = None
        if deployment is not None:
            return Lease(deployment, cold_start=False, clock=self._clock)
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, version))
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        try:
            deployment = await asyncio.wait_for(asyncio.shield(task), self._load_wait_s)
        except TimeoutError:
            raise ModelLoading(f"{name}:{version}", self._load_wait_s) from None
        except (ModelUnavailable, ModelLoading):
            raise
        except Exception as e:  # a corrupt blob, a graph that will not open: this version's fault
            log.error("%s:%d could not be loaded: %s", name, version, e)
            raise ModelLoadFailed(f"{name}:{version}", e) from e
        return Lease(deployment, cold_start=True, clock=self._clock)

    def retire_except(self, name: str, routed: set[int]) -> None:
        """An alias moved: loaded versions of `name` not in `routed` drain, then unload."""
        for d in self._loaded.values():
            if d.name == name and d.version not in routed and not d.retired:
                log.info("%s: no longer routed; unloading once its requests finish", d.ref)
                d.retired = True

    async def unload_idle(self) -> None:
        """Unload drained retired versions and those idle for idle_unload_s."""
        now = self._clock()
        for d in self.loaded:
            if d.in_flight:
                continue
            idle = self._idle_unload_s and now - d.last_used >= self._idle_unload_s
            if d.retired or idle:
                await self._unload(d)

    async def check_remote(self, timeout_s: float) -> None:
        """Ask every remote deployment's health: a replica that failed rejoins once it answers
        (`ReplicaSet.health`)."""
        for d in self.loaded:
            if d.remote:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(d.engine.health(), timeout_s)

    async def close(self) -> None:
        for task in self._loads.values():
            task.cancel()
        for d in self.loaded:
            await self._unload(d)

    async def _load(self, name: str, version: int) -> Deployment:
        started = time.perf_counter()  # a measurement for the metrics, not a decision
        loaded = await self._loader.load(name, version, self._make_room)
        engine = loaded.engine
        info = engine.info
        deployment = Deployment(
            name=name,
            version=version,
            engine=engine,
            info=info,
            tokenizer=Tokenizer.from_str(info.tokenizer_json),
            # a remote engine builds its table from the tokenizer (vocabulary-sized work)
            token_bytes=await asyncio.to_thread(engine.token_bytes),
            bytes=loaded.bytes,
            remote=loaded.remote,
            load_s=time.perf_counter() - started,
            last_used=self._clock(),
        )
        self._loaded[deployment.key] = deployment
        log.info("%s loaded in %.2f s (%s)", deployment.ref, deployment.load_s, info.target)
        if self._on_load:
            self._on_load(deployment)
        return deployment

    async def _make_room(self, needed: int) -> None:
        budget = self._budget
        if not budget:
            return
        if needed > budget:
            raise ModelUnavailable(
                f"the model needs {needed / 2**20:.0f} MiB, more than the whole memory budget "
                f"of {budget / 2**20:.0f} MiB"
            )
        local = [d for d in self._loaded.values() if not d.remote]
        used = sum(d.bytes for d in local)
        idle = sorted((d for d in local if d.in_flight == 0), key=lambda d: d.last_used)
        while used + needed > budget and idle:
            victim = idle.pop(0)
            log.info("%s evicted: the memory budget needs room", victim.ref)
            used -= victim.bytes
            await self._unload(victim)
        if used + needed > budget:
            raise ModelUnavailable(
                f"memory budget of {budget / 2**20:.0f} MiB is full with models serving "
                "requests; retry when they finish",
                retry_after_s=5.0,
            )

    async def _unload(self, deployment: Deployment) -> None:
        self._loaded.pop(deployment.key, None)
        try:
            await deployment.engine.close()
        except Exception:  # unloading must not fail the reaper
            log.exception("%s: closing its engine failed", deployment.ref)
        log.info("%s unloaded", deployment.ref)
        if self._on_unload:
            self._on_unload(deployment)
