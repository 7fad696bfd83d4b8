"""In-memory stand-ins for what the gateway talks to, so its lifecycle and HTTP API run in
milliseconds: a clock tests advance, a registry catalog of aliases, and an engine that streams
its prompt back (it satisfies `engine.api.EngineClient`).

    clock = FakeClock(); catalog = FakeCatalog({"tiny": 2}, production=1)
    loader = FakeLoader()                      # FakeEngine per load; counts and can hold loads
    app = create_app(config, catalog=catalog, loader=loader, clock=clock)

The engine's tokenizer is a real byte-level BPE of 256 single-byte tokens plus an end token,
built with `tokenizers`, so the gateway's tokenization, detokenized text and logprob bytes go
through the same code paths as with a trained model.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
from datetime import UTC, datetime
from functools import cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.detokenizer import TokenBytes
from engine.errors import EngineDead
from engine.outputs import EngineInfo, EngineStats, Health, RequestOutput, Timings, TokenLogprob
from engine.request import EngineRequest
from engine.stream import OutputStream
from gateway.models.deployments import Loaded, MakeRoom
from registry.errors import NotFound
from registry.names import Ref, parse_ref
from registry.records import AliasRecord

EOS = "<|end|>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@cache
def byte_tokenizer_json() -> str:
    """A byte-level BPE without merges: one token per byte (ids 0..255), EOS at 256."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
    return tokenizer.to_str()


def fake_info(model: str = "tiny", version: str | None = "1", **kw) -> EngineInfo:
    fields = dict(
        model=model,
        version=version,
        target="fake",
        provider="none",
        max_len=512,
        n_slots=4,
        vocab_size=257,
        eos_id=256,
        stop_ids=(256,),
        tokenizer_json=byte_tokenizer_json(),
        chat_template=CHATML,
        eos_token=EOS,
        kv_bytes=1000,
    )
    return EngineInfo(**(fields | kw))


class FakeEngine:
    """Answers each request with its prompt's token ids, repeated up to max_tokens (a stop id
    ends it early), for each of its n choices. `pause()` holds every stream before its next
    token until `resume()`; `kill()` fails it as a dead runtime would; `fail_next(why)` ends
    the next request with an "error" event, as the engine does when one request's output
    handling raises."""

    def __init__(self, info: EngineInfo | None = None, *, address: str = "fake:0"):
        self.info = info or fake_info()
        self.address = address  # as a remote replica is named
        self.submitted: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.closed = False
        self._dead: str | None = None
        self._fail_next: str | None = None
        self._go = asyncio.Event()
        self._go.set()
        self._running: dict[str, tuple[OutputStream, asyncio.Task]] = {}

    # ── engine.api.EngineClient ──

    async def submit(self, request: EngineRequest) -> OutputStream:
        self._check_alive()
        self.submitted.append(request)
        stream = OutputStream(request.request_id, request.sampling.n, self.abort, self._forget)
        task = asyncio.create_task(self._emit(stream, request, self._fail_next))
        self._fail_next = None
        self._running[request.request_id] = (stream, task)
        return stream

    async def abort(self, request_id: str) -> bool:
        running = self._running.pop(request_id, None)
        if running is None:
            return False
        self.aborted.append(request_id)
        running[1].cancel()
        return True

    async def health(self) -> Health:
        if self._dead is not None:
            return Health(ok=False, status="dead", detail=self._dead)
        if self.closed:
            return Health(ok=False, status="stopped", detail="closed")
        return Health(ok=True, status="ok")

    async def stats(self) -> EngineStats:
        self._check_alive()
        n = len(self._running)
        return EngineStats(
            slots_total=self.info.n_slots,
            slots_used=min(n, self.info.n_slots),
            queue_depth=max(0, n - self.info.n_slots),
            max_waiting=16,
            kv_tokens_used=0,
            kv_tokens_total=self.info.n_slots * self.info.max_len,
            kv_usage=0.0,
            tokens_per_s=0.0,
            prompt_tokens_total=sum(len(r.prompt_token_ids) for r in self.submitted),
            generated_tokens_total=0,
            requests_total=len(self.submitted),
            steps_total=0,
        )

    async def close(self) -> None:
        self.closed = True
        self._fail_all(EngineDead(f"engine for {self.info.model} stopped"))

    def token_bytes(self) -> TokenBytes:
        return _token_bytes(self.info.tokenizer_json)

    # ── as a remote replica ──

    async def connect(self) -> FakeEngine:
        self._check_alive()
        return self

    # ── test controls ──

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def kill(self, why: str = "the runtime crashed") -> None:
        self._dead = why
        self._fail_all(EngineDead(why))

    def fail_next(self, why: str) -> None:
        self._fail_next = why

    def revive(self) -> None:
        """As an engine server restarted on its address."""
        self._dead = None

    # ── internals ──

    async def _emit(self, stream: OutputStream, request: EngineRequest, fail: str | None) -> None:
        prompt = request.prompt_token_ids
        token_bytes = self.token_bytes()
        if fail is not None:
            await self._go.wait()
            for index in range(request.sampling.n):
                out = RequestOutput(request.request_id, index, finish_reason="error", error=fail)
                stream.put(out)
            self._running.pop(request.request_id, None)
            return
        for index in range(request.sampling.n):
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            for count, token in enumerate(itertools.islice(itertools.cycle(prompt),
                                                           request.max_tokens), 1):  # fmt: skip
                await self._go.wait()
                stop = token in request.stop_token_ids
                finish = "stop" if stop else "length" if count == request.max_tokens else None
                logprobs = None
                if request.sampling.logprobs is not None:
                    top = ((token, 0.0),)[: request.sampling.logprobs]
                    logprobs = (TokenLogprob(token, 0.0, top),)
                stream.put(
                    RequestOutput(
                        request_id=request.request_id,
                        index=index,
                        text=decoder.decode(token_bytes[token], final=finish is not None),
                        token_ids=(token,),
                        logprobs=logprobs,
                        finish_reason=finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=count,
                        timings=Timings(0.0, 0.001, 0.002) if finish else None,
                    )
                )
                if finish:
                    break
        self._running.pop(request.request_id, None)

    def _forget(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def _fail_all(self, error: EngineDead) -> None:
        for stream, task in self._running.values():
            task.cancel()
            stream.put(error)
        self._running.clear()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDead(self._dead)
        if self.closed:
            raise EngineDead(f"engine for {self.info.model} stopped")


@cache
def _token_bytes(tokenizer_json: str) -> TokenBytes:
    return TokenBytes(tokenizer_json)


class FakeLoader:
    """Starts a FakeEngine per load, holding `weights_bytes` plus its KV bytes in this process.
    `hold()` makes loads wait until `release()`; `loads` lists every load by "name:version"."""

    def __init__(self, weights_bytes: int = 10_000):
        self.weights_bytes = weights_bytes
        self.loads: list[str] = []
        self.engines: dict[str, FakeEngine] = {}  # the latest engine of each "name:version"
        self._gate = asyncio.Event()
        self._gate.set()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def load(self, name: str, version: int, make_room: MakeRoom) -> Loaded:
        ref = f"{name}:{version}"
        self.loads.append(ref)
        await self._gate.wait()
        await make_room(self.weights_bytes)
        engine = FakeEngine(fake_info(name, str(version)))
        self.engines[ref] = engine
        return Loaded(engine, bytes=self.weights_bytes + engine.info.kv_bytes, remote=False)


class FakeCatalog:
    """A registry's reading side in memory: versions 1..n of each model and their aliases."""

    def __init__(self, versions: dict[str, int], **aliases: int):
        self._versions = dict(versions)
        self._aliases: dict[str, dict[str, AliasRecord]] = {name: {} for name in versions}
        self.reads = 0  # registry round trips: what the resolve cache saves
        for alias, version in aliases.items():
            for name in versions:
                self.set_alias(name, alias, version)

    def set_alias(self, name: str, alias: str, version: int, weight: float | None = None) -> None:
        if not 1 <= version <= self._versions[name]:
            raise NotFound(f"{name}:{version} does not exist")
        self._aliases[name][alias] = AliasRecord(
            version=version,
            seq=len(self._aliases[name]),
            updated_at=datetime(2025, 1, 1, tzinfo=UTC),
            updated_by="test",
            weight=weight,
        )

    def models(self) -> list[str]:
        return sorted(self._versions)

    def aliases(self, name: str) -> dict[str, AliasRecord]:
        self.reads += 1
        if name not in self._versions:
            raise NotFound(f"no model named {name!r}")
        return dict(self._aliases[name])

    def resolve(self, ref: Ref | str) -> tuple[str, int]:
        self.reads += 1
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.name not in self._versions:
            raise NotFound(f"no model named {ref.name!r}")
        if ref.alias:
            if ref.alias not in self._aliases[ref.name]:
                raise NotFound(f"{ref.name} has no alias {ref.alias!r}")
            return ref.name, self._aliases[ref.name][ref.alias].version
        if ref.version and not 1 <= ref.version <= self._versions[ref.name]:
            raise NotFound(f"{ref.name}:{ref.version} does not exist")
        return ref.name, ref.version or self._versions[ref.name]
