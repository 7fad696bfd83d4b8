"""The in-process engine: `EngineCore` driven by a thread of its own, behind the async API of
`engine.api.EngineClient`.

    event loop (gateway)                 step thread
    ─────────────────────                ─────────────────────────────────────────
    submit() ─ lock: core.add ─┐         loop: lock: plan  → execute (no lock, the GIL is
    abort()  ─ lock: core.abort┤               released by ONNX Runtime) → lock: update
                               └─wake──►       outputs ─ call_soon_threadsafe ─► streams' queues

Admission runs in `submit()` under the lock, so Overloaded and ContextOverflow reach the caller
before it answers its client. One callback per step hands every output to the event loop; each
stream has its own queue. A request whose output handling fails ends alone, with an "error"
event (the core's output processor); an exception out of the step itself is the runtime failing,
and ends every stream with EngineDead.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from engine.core import EngineCore
from engine.detokenizer import TokenBytes
from engine.errors import EngineDead
from engine.outputs import EngineInfo, EngineStats, Health, RequestOutput
from engine.request import EngineRequest
from engine.stream import OutputStream

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, core: EngineCore, info: EngineInfo):
        self.core, self.info = core, info
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[str, OutputStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None

    # ── lifecycle ──

    def start(self) -> None:
        """Start the step thread; call from the event loop that will consume the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDead(f"engine for {self.info.model} stopped"))

    # ── the API ──

    async def submit(self, request: EngineRequest) -> OutputStream:
        if self._thread is None:
            self.start()
        self._check_alive()
        stream = OutputStream(request.request_id, request.sampling.n, self.abort, self._forget)
        with self._wake:
            self.core.add(request)  # raises Overloaded / ContextOverflow / InvalidRequest
            self._streams[request.request_id] = stream
            self._wake.notify()
        return stream

    async def abort(self, request_id: str) -> bool:
        with self._wake:
            found = self.core.abort(request_id)
            self._wake.notify()
        return found

    def token_bytes(self) -> TokenBytes:
        return self.core.token_bytes

    async def health(self) -> Health:
        if self._dead is not None:
            return Health(ok=False, status="dead", detail=str(self._dead))
        if self._stopping:
            return Health(ok=False, status="stopped", detail="the engine is shutting down")
        return Health(ok=True, status="ok")

    async def stats(self) -> EngineStats:
        # a page-table walk (mincore) that needs no lock: the step may run meanwhile
        resident = self.core.runner.kv_resident_bytes()
        with self._lock:
            core, usage = self.core, self.core.scheduler.usage()
            return EngineStats(
                slots_total=usage.n_slots,
                slots_used=usage.slots_used,
                queue_depth=core.scheduler.num_waiting,
                max_waiting=core.config.max_waiting,
                kv_tokens_used=usage.tokens_reserved,
                kv_tokens_total=usage.token_capacity,
                kv_usage=usage.fraction,
                tokens_per_s=core.tokens_per_s(),
                prompt_tokens_total=core.prompt_tokens_total,
                generated_tokens_total=core.generated_tokens_total,
                requests_total=core.requests_total,
                steps_total=core.steps_total,
                kv_resident_bytes=resident,
                memory_bytes=self.info.weights_bytes + resident,
                queue_waiting_for=usage.waiting_for or "",
                **core.feature_stats(),
            )

    # ── the step thread ──

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self.core.has_work() and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        return
                    plan = self.core.plan()
                ran = self.core.execute(plan)
                with self._lock:
                    outputs = self.core.update(plan, ran)
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as e:  # the runtime failed: nothing more can be served
            log.exception("engine step failed; the engine is dead")
            self._dead = e
            dead = EngineDead(f"engine for {self.info.model} failed: {type(e).__name__}: {e}")
            self._loop.call_soon_threadsafe(self._fail_all, dead)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, error: EngineDead) -> None:
        for stream in list(self._streams.values()):
            stream.put(error)
        self._streams.clear()

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"engine for {self.info.model} is dead: {self._dead}")
        if self._stopping:
            raise EngineDead(f"engine for {self.info.model} is stopped")
