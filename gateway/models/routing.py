"""Which version a request for a model goes to.

    "tiny"           → the production alias's version, or the canary alias's by its weight
    "tiny@staging"   → that alias's version
    "tiny:3"         → version 3, once the registry confirms it exists

Each resolution is cached for `ttl_s` seconds of the injected clock: a burst of requests costs
one registry read, and an alias move takes effect within `ttl_s`. When a refresh finds that a
cached route changed, `on_move(name, versions)` hears every version of that name some cached
route still names; the others can drain and unload.

A canary split is sticky where the caller has an identity (the key id, else the request's
`user`): it hashes to a stable number in [0, 1), so one caller always lands on the same side of
the split. Without one, each request draws afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.clock import Clock
from gateway.models.errors import ModelNotFound
from registry.errors import RegistryError
from registry.names import Ref, parse_ref
from registry.records import AliasRecord

PRODUCTION = "production"
CANARY = "canary"

Routes = tuple[tuple[int, float], ...]  # (version, share of the traffic)


class Catalog(Protocol):
    """What the gateway reads from the registry (`registry.registry.Registry` satisfies it)."""

    def models(self) -> list[str]: ...

    def aliases(self, name: str) -> dict[str, AliasRecord]: ...

    def resolve(self, ref: Ref | str) -> tuple[str, int]: ...


@dataclass(frozen=True)
class _Cached:
    name: str
    at: float  # clock seconds when the registry was read
    routes: Routes


class Router:
    def __init__(
        self,
        catalog: Catalog,
        *,
        ttl_s: float,
        clock: Clock,
        on_move: Callable[[str, set[int]], None],
        draw: Callable[[], float],  # in [0, 1): the canary draw of a caller with no identity
    ):
        self._catalog, self._ttl_s, self._clock = catalog, ttl_s, clock
        self._on_move, self._draw = on_move, draw
        self._cache: dict[str, _Cached] = {}  # a request's model, normalised → its routes

    async def route(self, model: str, sticky: str | None = None) -> tuple[str, int]:
        """(name, version) for `model`, spelled NAME, NAME@ALIAS or NAME:VERSION; `sticky`
        keeps one caller on one side of a canary. ModelNotFound if nothing matches."""
        try:
            ref = parse_ref(model)
        except RegistryError as e:
            raise ModelNotFound(model, str(e)) from None
        routes = await self._routes(ref)
        if len(routes) == 1:
            return ref.name, routes[0][0]
        (production, _), (canary, weight) = routes
        draw = _unit(sticky) if sticky else self._draw()
        return ref.name, canary if draw < weight else production

    def routed(self, model: str) -> bool:
        """Whether `model`, spelled as a request spelled it, resolved to a version here. Such a
        name comes from the registry, so it may label metrics; any other string is whatever a
        client sent, and each distinct label value would be a time series kept forever."""
        return model in self._cache

    def versions(self, name: str) -> set[int]:
        """Every version of `name` that some cached route names."""
        return {v for c in self._cache.values() if c.name == name for v, _ in c.routes}

    def expire(self, name: str) -> None:
        """Read `name`'s routes again at their next request: an alias of it moved through this
        process, so here the move takes effect at once (other replicas see it within ttl_s).
        The entries stay, expired, so the refresh still tells `on_move` what changed."""
        for key, cached in self._cache.items():
            if cached.name == name:
                self._cache[key] = replace(cached, at=-math.inf)

    async def _routes(self, ref: Ref) -> Routes:
        key = str(ref)
        cached = self._cache.get(key)
        if cached is not None and self._clock() - cached.at < self._ttl_s:
            return cached.routes
        explicit = ref.version is not None or ref.alias is not None
        read = self._explicit if explicit else self._split
        try:
            routes = await asyncio.to_thread(read, ref)
        except RegistryError as e:  # NotFound included
            raise ModelNotFound(key, str(e)) from None
        self._cache[key] = _Cached(ref.name, self._clock(), routes)
        if cached is not None and cached.routes != routes:
            self._on_move(ref.name, self.versions(ref.name))
        return routes

    def _explicit(self, ref: Ref) -> Routes:
        _, version = self._catalog.resolve(ref)
        return ((version, 1.0),)

    def _split(self, ref: Ref) -> Routes:
        """[(production, 1)] or, with a weighted canary on another version,
        [(production, 1 - w), (canary, w)]."""
        name = ref.name
        aliases = self._catalog.aliases(name)
        production = aliases.get(PRODUCTION)
        if production is None:
            known = ", ".join(f"{name}@{a}" for a in aliases) or f"{name}:VERSION"
            raise ModelNotFound(
                name,
                f"model {name!r} has no {PRODUCTION} alias; name a version or an alias ({known})",
            )
        canary = aliases.get(CANARY)
        if canary and canary.weight and canary.version != production.version:
            return ((production.version, 1 - canary.weight), (canary.version, canary.weight))
        return ((production.version, 1.0),)


def absent(ref: Ref) -> ModelNotFound:
    """What routing answers for a name the registry lacks, word for word: a model a caller may
    not see is answered the same, so the answer never tells that it exists."""
    if ref.alias is not None:
        return ModelNotFound(str(ref), f"{ref.name} has no alias {ref.alias!r}")
    if ref.version is not None:
        return ModelNotFound(str(ref), f"{ref.name}:{ref.version} does not exist")
    detail = f"model {ref.name!r} has no {PRODUCTION} alias; name a version or an alias"
    return ModelNotFound(ref.name, f"{detail} ({ref.name}:VERSION)")


def _unit(text: str) -> float:
    """A stable number in [0, 1) for a string (sticky canary assignment)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
