"""A model package folder → a running engine: pick the artifact, check its files against the
manifest, open it on the chosen execution provider, size the KV cache.

Settings are one typed struct (`EngineConfig`), validated where it is built, each error naming
the field, the value and the limit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec

from engine.async_engine import AsyncEngine
from engine.core import EngineCore
from engine.detokenizer import TokenBytes
from engine.graph import ORT, UnsupportedGraph, check_version
from engine.outputs import EngineInfo
from engine.runner import PROVIDERS, OrtRunner, ProviderUnavailable, StepRunner
from engine.scheduler import SchedulerConfig, check_kv_tokens, check_limits
from registry.manifest import Artifact, FileEntry, Manifest, ManifestError, check_files, load
from registry.verified import unverified

RUNTIMES = ("onnxruntime", "tensorrt")  # the artifact runtimes the engine runs
# the default KV pool is this share of n_slots × max_len: requests rarely fill their slots (the
# default at 32 × 2048 is 16384 positions, llama-server's default cache)
KV_TOKENS_SHARE = 4


class LoadError(RuntimeError):
    """The package cannot run here: damaged, no runnable target, or an unavailable provider."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's one settings type, and the only home of the defaults: the scheduler's
    settings (`scheduler()`) are built from it once the artifact fixes max_len, unchanged. A
    value outside its limit is refused here, never raised behind the user's back."""

    # the package artifact to run; None picks the fastest ONNX Runtime one (choose_artifact)
    target: str | None = None
    # "cpu", "cuda" or "tensorrt": the ONNX Runtime execution provider of an ONNX target (a
    # TensorRT plan target runs on the TensorRT runtime whatever this says)
    provider: str = "cpu"
    # ONNX Runtime intra-op threads; None lets it use every core
    threads: int | None = None
    # ONNX Runtime's worker threads spin between parallel sections (lower latency when the
    # engine has the cores to itself; off leaves them to the HTTP server on a small machine)
    spin_wait: bool = True
    # back the prepacked weights with 2 MiB pages where the kernel has transparent huge pages
    # (Linux): fewer TLB misses as each step streams the weights (never the KV cache, which
    # would become resident whole: engine/kv_memory.py)
    huge_pages: bool = True
    # sequences decoded together; each owns one KV row of max_len positions (address space:
    # only written positions are resident)
    n_slots: int = 32
    # tokens per slot, the limit of one request's prompt + max_tokens; None takes the artifact's
    max_len: int | None = None
    # positions the slots share (the KV pool): a request starts only while its prompt +
    # max_tokens fit beside the running ones', so the cache holds at most this many. None:
    # n_slots × max_len / KV_TOKENS_SHARE (16384 at 32 × 2048), at least max_len
    kv_tokens: int | None = None
    # tokens per step shared by prefill chunks and decodes, at least n_slots (every running
    # stream decodes one token per step); bounds a step's latency
    token_budget: int = 256
    # requests queued beyond the slots before Overloaded
    max_waiting: int = 256
    # the Retry-After hint when overloaded
    retry_after_s: float = 1.0
    # keep finished requests' cached positions while their slots are not needed; a new request
    # whose prompt starts with them copies them instead of prefilling (engine/prefix_cache.py)
    prefix_caching: bool = False
    # n-gram draft tokens a decoding request may carry, verified in its forward; 0 is off
    # (engine/speculative.py: it also turns itself off where it does not pay)
    speculative_tokens: int = 0
    # prompt tokens per step while any stream decodes, 0 for what the token budget leaves:
    # bounds the inter-token gap the running streams see while long prompts arrive
    # (SchedulerConfig.max_prefill_tokens)
    max_prefill_tokens: int = 0
    # one forward may carry chunks of different lengths on different pasts (decodes beside a
    # prompt chunk), right-padded, where that costs less than separate forwards; ONNX targets,
    # through GroupQueryAttention's query_seqlens (engine/runner.py)
    mixed_forwards: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(
                f"EngineConfig.provider = {self.provider!r} must be one of {', '.join(PROVIDERS)}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"EngineConfig.threads = {self.threads} must be >= 1")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"EngineConfig.max_len = {self.max_len} must be >= 2")
        if self.kv_tokens is not None and self.max_len is not None:
            check_kv_tokens("EngineConfig", self.kv_tokens, self.n_slots, self.max_len)
        elif self.kv_tokens is not None and self.kv_tokens < 2:
            raise ValueError(f"EngineConfig.kv_tokens = {self.kv_tokens} must be >= 2")
        check_limits(
            "EngineConfig", self.n_slots, self.token_budget, self.max_waiting, self.retry_after_s
        )
        if self.speculative_tokens < 0:
            raise ValueError(
                f"EngineConfig.speculative_tokens = {self.speculative_tokens} must be >= 0 "
                f"(0 turns speculative decoding off)"
            )
        if self.max_prefill_tokens < 0:
            raise ValueError(
                f"EngineConfig.max_prefill_tokens = {self.max_prefill_tokens} must be >= 0 "
                f"(0 is no limit but the token budget)"
            )

    def pool(self, max_len: int) -> int:
        """kv_tokens once the artifact has fixed max_len (the default, or the one given)."""
        if self.kv_tokens is not None:
            return self.kv_tokens
        return max(max_len, self.n_slots * max_len // KV_TOKENS_SHARE)

    def scheduler(self, max_len: int, compact_slots: bool = True) -> SchedulerConfig:
        return SchedulerConfig(
            n_slots=self.n_slots,
            max_len=max_len,
            token_budget=self.token_budget,
            max_waiting=self.max_waiting,
            retry_after_s=self.retry_after_s,
            compact_slots=compact_slots,
            kv_tokens=self.pool(max_len),
            prefix_caching=self.prefix_caching,
            speculative_tokens=self.speculative_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
        )


def choose_artifact(manifest: Manifest, target: str | None = None) -> Artifact:
    """`target`, or the fastest ONNX Runtime artifact on a CPU: artifacts that passed parity
    first, then fewer weight bits (int4 > int8 > fp32), then the ORT flavour over the portable.
    A TensorRT plan runs only when named: it is tied to the GPU and TensorRT that built it."""
    if target is not None:
        try:
            artifact = manifest.artifact(target)
        except ManifestError as e:
            raise LoadError(str(e)) from None
        if artifact.runtime not in RUNTIMES:
            raise LoadError(
                f"{target} runs on {artifact.runtime}; the engine runs {', '.join(RUNTIMES)}"
            )
        return artifact
    runnable = [a for a in manifest.artifacts if a.runtime == "onnxruntime"]
    if not runnable:
        raise LoadError("the package has no ONNX Runtime artifact")

    def rank(a: Artifact) -> tuple:
        report = manifest.reports.parity.get(a.target)
        failed = report is not None and not report.passed
        bits = a.quantization.bits if a.quantization else 32
        return (failed, bits, a.flavour != ORT)

    return min(runnable, key=rank)


def _open_runner(
    package_dir: Path, artifact: Artifact, config: EngineConfig, max_len: int
) -> StepRunner:
    path = package_dir / artifact.entry
    if artifact.runtime == "tensorrt":
        from engine import trt_runner  # imports tensorrt and torch's CUDA only for a plan

        if artifact.max_batch is not None and config.n_slots > artifact.max_batch:
            raise LoadError(
                f"{artifact.target} takes at most {artifact.max_batch} sequences per step; "
                f"--slots (n_slots) is {config.n_slots}: ask for {artifact.max_batch} or fewer"
            )
        trt = trt_runner.load_tensorrt()
        trt_runner.check_plan(
            artifact.trt_version, artifact.gpu_arch, trt.__version__, trt_runner.device_arch()
        )
        return trt_runner.TrtRunner(path, config.n_slots, max_len)
    return OrtRunner(
        path,
        config.n_slots,
        max_len,
        threads=config.threads,
        provider=config.provider,
        spin_wait=config.spin_wait,
        huge_pages=config.huge_pages,
        mixed=config.mixed_forwards,
    )


def _check_files(package_dir: Path, entries: list[FileEntry]) -> list[str]:
    """The problems with `entries`, hashing only the files the local cache has not verified
    in their present state (registry/verified.py): a pulled package is hashed once, at the
    pull, not again at every load (~0.3 s of a cold start for SmolLM2-135M int4)."""
    return check_files(package_dir, unverified(package_dir, entries))


def _token_bytes(package_dir: Path) -> tuple[str, TokenBytes]:
    text = (package_dir / "tokenizer.json").read_text(encoding="utf-8")
    return text, TokenBytes(text)


def open_core(
    package_dir: str | Path, config: EngineConfig = EngineConfig()
) -> tuple[EngineCore, EngineInfo]:
    """The synchronous engine of a package (tests, `aimass generate`), and what it serves."""
    package_dir = Path(package_dir)
    try:
        manifest = load(package_dir)
    except (ManifestError, OSError) as e:
        raise LoadError(f"{package_dir}: {e}") from None
    artifact = choose_artifact(manifest, config.target)
    source = f"{package_dir} target {artifact.target}"
    try:
        # the manifest's record: the only one a TensorRT plan has (the runner checks an ONNX
        # graph's own metadata too)
        check_version(artifact.graph_version, source)
    except UnsupportedGraph as e:
        raise LoadError(str(e)) from None
    max_len = config.max_len or artifact.max_len
    if max_len > artifact.max_len:
        raise LoadError(
            f"EngineConfig.max_len = {max_len} exceeds the {artifact.target} context of "
            f"{artifact.max_len}"
        )
    try:
        check_kv_tokens("EngineConfig", config.pool(max_len), config.n_slots, max_len)
    except ValueError as e:
        raise LoadError(str(e)) from None
    # the file check (hashing, without the GIL) and the token table run beside the session's
    # creation, the three long parts of a cold start; a damaged package is refused all the same
    # before anything runs on it, and before any error the damage may have caused
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="engine-load") as pool:
        checked = pool.submit(
            _check_files, package_dir, [*manifest.tokenizer.files, *artifact.files]
        )
        token_bytes = pool.submit(_token_bytes, package_dir)
        try:
            runner, failure = _open_runner(package_dir, artifact, config, max_len), None
        except Exception as e:  # raised below, once the file check has had its say
            runner, failure = None, e
        problems = checked.result()
    if problems:
        raise LoadError(f"{package_dir} is damaged: {'; '.join(problems)}")
    if isinstance(failure, ProviderUnavailable):
        raise LoadError(f"{artifact.target}: {failure}") from None
    if isinstance(failure, UnsupportedGraph):  # it names the file; the package and target say more
        raise LoadError(str(UnsupportedGraph(failure.version, source))) from None
    if failure is not None:
        raise failure
    tokenizer_json, table = token_bytes.result()
    core = EngineCore(runner, config.scheduler(max_len, runner.can_move), table)
    tok = manifest.tokenizer
    gen = manifest.generation
    info = EngineInfo(
        model=manifest.name or package_dir.name,
        version=None,
        target=artifact.target,
        provider=runner.provider,
        max_len=max_len,
        n_slots=config.n_slots,
        vocab_size=manifest.model.vocab_size,
        eos_id=tok.eos_id,
        stop_ids=tuple(dict.fromkeys([tok.eos_id, *tok.stop_ids, *gen.stop_ids])),
        tokenizer_json=tokenizer_json,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        generation_defaults={
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "top_k": gen.top_k,
            "max_tokens": gen.max_tokens,
        },
        kv_bytes=config.pool(max_len) * runner.kv_token_bytes,
        weights_bytes=sum(f.size for f in artifact.files),
        kv_tokens=config.pool(max_len),
    )
    return core, info


def load_engine(
    package_dir: str | Path,
    config: EngineConfig = EngineConfig(),
    *,
    model: str | None = None,
    version: str | None = None,
) -> AsyncEngine:
    """The in-process engine of a package (not started: it starts on first use, or start())."""
    core, info = open_core(package_dir, config)
    if model is not None or version is not None:
        info = msgspec.structs.replace(info, model=model or info.model, version=version)
    return AsyncEngine(core, info)
