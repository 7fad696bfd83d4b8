"""Serverless models: which version a request goes to, loading it on first use, unloading it.

    request "name" ──resolve (cached briefly)──► production version, or the canary's by weight
                   ─acquire──► Deployment (loaded) ─► lease (in-flight +1) ─► engine
                               │ not loaded: one shared load task per version:
                               │   registry → verified local cache → engine (in a thread)
                               ▼ the request waits up to load_wait_s, then 503 + Retry-After

A reaper unloads a deployment when it has been idle for `idle_unload_s` (scale to zero), or as
soon as it is idle after its alias moved away (the old version drains its in-flight requests
first). Before a load, the least recently used idle deployments are evicted until the new one
fits the memory budget. Remote engine servers configured for a model are used instead of
loading it here; requests go to the healthy replica with the fewest outstanding requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from engine.api import EngineClient
from engine.client import RemoteEngine
from engine.detokenizer import TokenBytes
from engine.errors import EngineDead
from engine.loader import EngineConfig, choose_artifact, load_engine
from engine.outputs import EngineInfo, Health
from gateway.errors import ModelLoading, ModelNotFound, ModelUnavailable
from gateway.openai.chat_template import ChatTemplate
from registry.cache import pull
from registry.errors import NotFound, RegistryError
from registry.manifest import load as load_manifest
from registry.names import parse_ref
from registry.registry import Registry

log = logging.getLogger(__name__)

PRODUCTION = "production"
CANARY = "canary"


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
    # seconds between reaper passes (idle unload, drained versions)
    reap_every_s: float = 5.0
    # the engine settings of every in-process load
    engine: EngineConfig = field(default_factory=EngineConfig)
    # remote engine servers: "name" or "name:version" → ["host:port", ...]
    remote: dict[str, list[str]] = field(default_factory=dict)
    # the local package cache (None: $AIMASS_HOME/cache)
    cache_dir: Path | None = None


@dataclass(eq=False)
class Deployment:
    """One version, ready to serve: its engine, tokenizer and chat template."""

    name: str
    version: int
    engine: EngineClient
    info: EngineInfo
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    token_bytes: TokenBytes  # token id → its bytes (logprobs' token strings and bytes)
    bytes: int  # weights + KV cache, for the memory budget
    remote: bool
    load_s: float
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False  # no alias routes here any more: unload once drained

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class Lease:
    """A deployment held for one request; `release()` (or `async with`) returns it."""

    def __init__(self, deployment: Deployment, cold_start: bool):
        self.deployment, self.cold_start = deployment, cold_start
        self._released = False
        deployment.in_flight += 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.deployment.in_flight -= 1
            self.deployment.last_used = time.monotonic()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        config: ModelsConfig,
        *,
        on_load: Callable[[Deployment], None] | None = None,
        on_unload: Callable[[Deployment], None] | None = None,
    ):
        self.registry, self.config = registry, config
        self._deployments: dict[tuple[str, int], Deployment] = {}
        self._loads: dict[tuple[str, int], asyncio.Task] = {}
        self._routes: dict[str, tuple[float, list[tuple[int, float]]]] = {}  # name → versions
        self._on_load, self._on_unload = on_load, on_unload
        self._reaper: asyncio.Task | None = None

    # ── lifecycle ──

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in self._loads.values():
            task.cancel()
        for deployment in list(self._deployments.values()):
            await self._unload(deployment)

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def routed(self, model: str) -> bool:
        """Whether `model`, spelled as a request spelled it, resolved to a version here. Such a
        name comes from the registry, so it may label metrics; any other string is whatever a
        client sent, and each distinct label value would be a time series kept forever."""
        return model in self._routes

    def ready(self) -> bool:
        """Nothing is loading; every loaded deployment is usable (checked by health())."""
        return not self._loads

    # ── routing ──

    async def acquire(self, model: str, sticky: str | None = None) -> Lease:
        """The deployment a request for `model` goes to, loaded if needed.

        `model` is NAME (its production alias, or a canary by weight), NAME@ALIAS or
        NAME:VERSION. `sticky` (the caller's key) keeps one caller on one side of a canary."""
        name, version = await self._route(model, sticky)
        deployment = self._deployments.get((name, version))
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
            return Lease(deployment, cold_start=False)
        task = self._loads.get((name, version))
        if task is None:
            task = asyncio.create_task(self._load(name, version))
            self._loads[(name, version)] = task
            task.add_done_callback(lambda _: self._loads.pop((name, version), None))
        try:
            deployment = await asyncio.wait_for(asyncio.shield(task), self.config.load_wait_s)
        except TimeoutError:
            raise ModelLoading(f"{name}:{version}", self.config.load_wait_s) from None
        return Lease(deployment, cold_start=True)

    async def _route(self, model: str, sticky: str | None) -> tuple[str, int]:
        try:
            ref = parse_ref(model)
        except RegistryError as e:
            raise ModelNotFound(model, str(e)) from None
        if ref.version is not None or ref.alias is not None:
            return await self._resolve(str(ref))
        choices = await self._weights(ref.name)
        if len(choices) == 1:
            return ref.name, choices[0][0]
        (prod, _), (canary, weight) = choices
        # the same caller always lands on the same side; no caller: a fresh draw each time
        draw = _unit(sticky) if sticky else _unit(str(time.perf_counter_ns()))
        return ref.name, canary if draw < weight else prod

    async def _weights(self, name: str) -> list[tuple[int, float]]:
        """[(production version, 1 - w)] or [(production, 1 - w), (canary version, w)]."""
        cached = self._routes.get(name)
        if cached and time.monotonic() - cached[0] < self.config.resolve_ttl_s:
            return cached[1]
        try:
            aliases = await asyncio.to_thread(self.registry.aliases, name)
        except (NotFound, RegistryError) as e:
            raise ModelNotFound(name, str(e)) from None
        prod = aliases.get(PRODUCTION)
        if prod is None:
            known = ", ".join(f"{name}@{a}" for a in aliases) or f"{name}:VERSION"
            raise ModelNotFound(
                name,
                f"model {name!r} has no {PRODUCTION} alias; name a version or an alias ({known})",
            )
        routes = [(prod.version, 1.0)]
        canary = aliases.get(CANARY)
        if canary and canary.weight and canary.version != prod.version:
            routes = [(prod.version, 1 - canary.weight), (canary.version, canary.weight)]
        previous = cached[1] if cached else None
        self._routes[name] = (time.monotonic(), routes)
        if previous and previous != routes:
            self._retire_unrouted(name, {v for v, _ in routes})
        return routes

    async def _resolve(self, ref: str) -> tuple[str, int]:
        cached = self._routes.get(ref)
        if cached and time.monotonic() - cached[0] < self.config.resolve_ttl_s:
            return parse_ref(ref).name, cached[1][0][0]
        try:
            name, version = await asyncio.to_thread(self.registry.resolve, ref)
        except (NotFound, RegistryError) as e:
            raise ModelNotFound(ref, str(e)) from None
        previous = cached[1][0][0] if cached else None
        self._routes[ref] = (time.monotonic(), [(version, 1.0)])
        if previous is not None and previous != version:
            self._retire_unrouted(name, {version})
        return name, version

    def _retire_unrouted(self, name: str, routed: set[int]) -> None:
        """An alias moved: versions of `name` no route names any more drain, then unload."""
        still = {
            v for key, (_, routes) in self._routes.items() if parse_ref(key).name == name
            for v, _ in routes
        } | routed  # fmt: skip
        for d in self._deployments.values():
            if d.name == name and d.version not in still and not d.retired:
                log.info("%s: no longer routed; unloading once its requests finish", d.ref)
                d.retired = True

    # ── loading ──

    async def _load(self, name: str, version: int) -> Deployment:
        started = time.monotonic()
        remote = self.config.remote.get(f"{name}:{version}") or self.config.remote.get(name)
        if remote:
            engine = ReplicaSet([RemoteEngine(*_host_port(a)) for a in remote])
            await engine.connect()
            size, is_remote = 0, True
        else:
            package = await asyncio.to_thread(
                pull, self.registry, f"{name}:{version}", cache_dir=self.config.cache_dir
            )
            size = _artifact_bytes(package, self.config.engine.target)
            await self._make_room(size)
            engine = await asyncio.to_thread(
                load_engine, package, self.config.engine, model=name, version=str(version)
            )
            size += engine.core.runner.kv_bytes
            engine.start()
            is_remote = False
        info = engine.info
        template = None
        if info.chat_template:
            template = ChatTemplate(
                info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
            )
        deployment = Deployment(
            name=name,
            version=version,
            engine=engine,
            info=info,
            tokenizer=Tokenizer.from_str(info.tokenizer_json),
            chat_template=template,
            # an in-process engine built this table already; a remote one's comes from its info
            token_bytes=(
                await asyncio.to_thread(TokenBytes, info.tokenizer_json)
                if is_remote
                else engine.core.token_bytes
            ),
            bytes=size,
            remote=is_remote,
            load_s=time.monotonic() - started,
        )
        self._deployments[deployment.key] = deployment
        log.info("%s loaded in %.2f s (%s)", deployment.ref, deployment.load_s, info.target)
        if self._on_load:
            self._on_load(deployment)
        return deployment

    async def _make_room(self, needed: int) -> None:
        budget = self.config.memory_budget_bytes
        if not budget:
            return
        if needed > budget:
            raise ModelUnavailable(
                f"the model needs {needed / 2**20:.0f} MiB, more than the whole memory budget "
                f"of {budget / 2**20:.0f} MiB"
            )
        used = sum(d.bytes for d in self._deployments.values() if not d.remote)
        idle = sorted(
            (d for d in self._deployments.values() if d.in_flight == 0 and not d.remote),
            key=lambda d: d.last_used,
        )
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
        self._deployments.pop(deployment.key, None)
        try:
            await deployment.engine.close()
        except Exception:  # unloading must not fail the reaper
            log.exception("%s: closing its engine failed", deployment.ref)
        log.info("%s unloaded", deployment.ref)
        if self._on_unload:
            self._on_unload(deployment)

    async def reap(self) -> None:
        """One pass: health-check remote replicas (a failed one rejoins once it answers), then
        unload drained retired versions and idle ones."""
        for d in list(self._deployments.values()):
            if d.remote:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(d.engine.health(), self.config.reap_every_s)
        now = time.monotonic()
        for d in list(self._deployments.values()):
            if d.in_flight:
                continue
            idle = self.config.idle_unload_s and now - d.last_used >= self.config.idle_unload_s
            if d.retired or idle:
                await self._unload(d)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_every_s)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")


class ReplicaSet:
    """Several engine servers of one model as one engine: least outstanding requests among the
    healthy ones; a replica that fails is skipped until a health check finds it back."""

    def __init__(self, replicas: list[RemoteEngine]):
        self.replicas = replicas
        self._outstanding = {id(r): 0 for r in replicas}
        self._healthy = {id(r): True for r in replicas}
        self.info: EngineInfo | None = None

    async def connect(self) -> None:
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

    async def submit(self, request):
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

    async def stats(self):
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


def _unit(text: str) -> float:
    """A stable number in [0, 1) for a string (sticky canary assignment)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"engine server address {address!r} must be HOST:PORT")
    return host, int(port)


def _artifact_bytes(package: Path, target: str | None) -> int:
    """The size of the files the engine will load (the weights dominate)."""
    artifact = choose_artifact(load_manifest(package), target)
    return sum(f.size for f in artifact.files)
