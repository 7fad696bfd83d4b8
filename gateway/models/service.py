"""Serverless models, as the routes and the generation service see them: one call,
`acquire(model)`, turns a request's model name into a loaded engine held for the request.

    "tiny" ──Router (routing.py)──► tiny:2 ──Deployments (deployments.py)──► Lease ──► engine
            alias or canary by weight,        loaded, or one shared load          │
            cached resolve_ttl_s              via RegistryLoader (loader.py):      │
                                              registry → verified cache → engine,  │
                                              or engine servers (replicas.py)      ▼
                                                                          release() when done

A reaper pass every reap_every_s health-checks remote replicas, then unloads versions no route
names any more once drained and versions idle for idle_unload_s. Time comes from one injected
clock (`gateway.clock`), so tests advance it instead of sleeping past a TTL.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.loader import EngineConfig
from gateway.clock import Clock, monotonic
from gateway.models.deployments import Deployment, Deployments, Lease, Loader
from gateway.models.errors import ModelLoadFailed, ModelLoading, ModelUnavailable
from gateway.models.loader import RegistryLoader
from gateway.models.routing import Catalog, Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelsConfig:
    # seconds a loaded model may sit idle before it is unloaded (0 = never)
    idle_unload_s: float = 600.0
    # bytes of weights + KV cache all loaded models may use together (0 = no limit)
    memory_budget_bytes: int = 0
    # seconds a request waits for its model to load before 503 + Retry-After
    load_wait_s: float = 60.0
    # seconds an alias resolution is reused: alias moves take effect within this time
    resolve_ttl_s: float = 2.0
    # seconds between reaper passes (idle unload, drained versions, remote health)
    reap_every_s: float = 5.0
    # the engine settings of every in-process load
    engine: EngineConfig = field(default_factory=EngineConfig)
    # remote engine servers: "name" or "name:version" → ["host:port", ...]
    remote: dict[str, list[str]] = field(default_factory=dict)
    # the local package cache (None: $AIMASS_HOME/cache)
    cache_dir: Path | None = None


class ModelManager:
    def __init__(
        self,
        registry: Catalog,
        config: ModelsConfig,
        *,
        loader: Loader | None = None,  # None: RegistryLoader over `registry` (a Registry)
        clock: Clock = monotonic,
        draw: Callable[[], float] = random.random,  # in [0, 1): canary draw, caller unknown
        on_load: Callable[[Deployment], None] | None = None,
        on_unload: Callable[[Deployment], None] | None = None,
        # a request routed to name:version that the version could not take (it would not load,
        # no room, no engine server answered): counted against that version (a canary's health)
        on_refused: Callable[[str, int], None] | None = None,
    ):
        self.registry, self.config = registry, config
        self._on_refused = on_refused
        if loader is None:
            loader = RegistryLoader(
                registry, engine=config.engine, remote=config.remote, cache_dir=config.cache_dir
            )
        self._deployments = Deployments(
            loader,
            clock=clock,
            memory_budget_bytes=config.memory_budget_bytes,
            load_wait_s=config.load_wait_s,
            idle_unload_s=config.idle_unload_s,
            on_load=on_load,
            on_unload=on_unload,
        )
        self._router = Router(
            registry,
            ttl_s=config.resolve_ttl_s,
            clock=clock,
            on_move=self._deployments.retire_except,
            draw=draw,
        )
        self._reaper: asyncio.Task | None = None

    # ── lifecycle ──

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self._deployments.close()

    @property
    def deployments(self) -> list[Deployment]:
        return self._deployments.loaded

    def routed(self, model: str) -> bool:
        """Whether `model`, as a request spelled it, resolved here (so it may label metrics)."""
        return self._router.routed(model)

    def alias_moved(self, name: str) -> None:
        """An alias of `name` moved through this process: route its next request afresh."""
        self._router.expire(name)

    def ready(self) -> bool:
        """Nothing is loading; every loaded deployment is usable (checked by health())."""
        return not self._deployments.loading

    # ── serving ──

    async def acquire(self, model: str, sticky: str | None = None) -> Lease:
        """The deployment a request for `model` goes to, loaded if needed.

        `model` is NAME (its production alias, or a canary by weight), NAME@ALIAS or
        NAME:VERSION. `sticky` (the caller's key) keeps one caller on one side of a canary."""
        name, version = await self._router.route(model, sticky)
        try:
            return await self._deployments.acquire(name, version)
        except (ModelLoadFailed, ModelLoading, ModelUnavailable):
            if self._on_refused is not None:
                self._on_refused(name, version)
            raise

    async def reap(self) -> None:
        """One pass: health-check remote replicas (a failed one rejoins once it answers), then
        unload drained retired versions and idle ones."""
        await self._deployments.check_remote(self.config.reap_every_s)
        await self._deployments.unload_idle()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_every_s)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")
