"""Where the gateway's engines come from: the engine servers configured for a model (several
replicas balanced as one, `replicas.ReplicaSet`), else the package pulled from the registry into
the local cache (sha256-verified) and run in this process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine.client import RemoteEngine
from engine.loader import EngineConfig, choose_artifact, load_engine
from gateway.models.deployments import Loaded, MakeRoom
from gateway.models.replicas import ReplicaSet, host_port
from registry.cache import pull
from registry.manifest import load as load_manifest
from registry.registry import Registry


class RegistryLoader:
    def __init__(
        self,
        registry: Registry,
        *,
        engine: EngineConfig,  # the settings of every in-process engine
        remote: dict[str, list[str]],  # "name" or "name:version" → ["host:port", ...]
        cache_dir: Path | None,  # the local package cache (None: $AIMASS_HOME/cache)
    ):
        self._registry, self._engine = registry, engine
        self._remote, self._cache_dir = remote, cache_dir

    async def load(self, name: str, version: int, make_room: MakeRoom) -> Loaded:
        addresses = self._remote.get(f"{name}:{version}") or self._remote.get(name)
        if addresses:
            replicas = ReplicaSet([RemoteEngine(*host_port(a)) for a in addresses])
            return Loaded(await replicas.connect(), bytes=0, remote=True)
        package = await asyncio.to_thread(
            pull, self._registry, f"{name}:{version}", cache_dir=self._cache_dir
        )
        weights = _artifact_bytes(package, self._engine.target)
        await make_room(weights)
        engine = await asyncio.to_thread(
            load_engine, package, self._engine, model=name, version=str(version)
        )
        engine.start()  # its step thread hands outputs to this event loop
        # the budget counts what the engine may come to hold: its weights and a full KV pool
        # (info.kv_bytes: kv_tokens positions, resident as they are written; /metrics shows the
        # resident figure, EngineStats.memory_bytes)
        return Loaded(engine, bytes=weights + engine.info.kv_bytes, remote=False)


def _artifact_bytes(package: Path, target: str | None) -> int:
    """The size of the files the engine will load (the weights dominate)."""
    artifact = choose_artifact(load_manifest(package), target)
    return sum(f.size for f in artifact.files)
