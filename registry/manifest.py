"""The model package manifest (contract 1): what a package holds, stated explicitly.

    PACKAGE/
      manifest.json          this schema; written last, so its presence means the rest is there
      tokenizer.json         tokenizers' format        ┐ listed in tokenizer.files
      tokenizer_config.json  special tokens, template  │ with sha256 and size
      chat_template.jinja    the chat template          ┘
      onnx-fp32/model.onnx   one folder per artifact, every file listed in artifacts[].files
      ...

Nothing is inferred from file names: the architecture, dtype, quantization, context, special
tokens, lineage and the files of each artifact are all fields here.

Schema evolution (msgspec docs, "Schema Evolution"): readers accept fields they do not know, so
a package written by a newer minor version still opens; every field added later goes last in
its Struct and has a default, so older packages still decode. `schema_version` is the major
version, bumped only for a change old readers must not misread; `decode` refuses a newer one.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from aimass_common.files import sha256_file

SCHEMA_VERSION = 1  # the major version this code writes and the newest it reads
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest cannot be read: bad JSON, a field of the wrong type, or a newer major schema."""


class FileEntry(msgspec.Struct, kw_only=True):
    path: str  # relative to the package folder, "/"-separated; never absolute, never ".."
    sha256: str  # hex digest of the file's bytes
    size: int  # bytes


class ModelSpec(msgspec.Struct, kw_only=True):
    # "llama": RMSNorm, rotary, SwiGLU, grouped-query attention (trainer/model.py)
    architecture: str
    vocab_size: int
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads
    head_dim: int
    ffn_dim: int  # hidden width of the SwiGLU feed-forward
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool  # the LM head shares the token embedding matrix


class TokenizerSpec(msgspec.Struct, kw_only=True):
    files: list[FileEntry]  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    eos_token: str
    eos_id: int
    bos_token: str | None = None
    bos_id: int | None = None
    pad_token: str | None = None
    pad_id: int | None = None
    stop_tokens: list[str] = []  # tokens that end a generation (EOS, end of turn)
    stop_ids: list[int] = []
    chat_template: str | None = None  # Jinja, rendered sandboxed; None for a plain LM
    chat_template_file: str | None = None  # the same template as a file in the package


class GenerationDefaults(msgspec.Struct, kw_only=True):
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = no top-k cut
    max_tokens: int = 256
    stop_ids: list[int] = []


class Lineage(msgspec.Struct, kw_only=True):
    base_model: str | None = None  # the checkpoint or imported model this one was tuned from
    dataset_sha256: str | None = None  # sha256 of the training tokens
    code_revision: str | None = None  # git commit of the training code
    run: str | None = None  # the training run folder
    checkpoint: str | None = None  # the checkpoint folder exported
    checkpoint_sha256: str | None = None  # sha256 of its model.safetensors
    checkpoint_step: int | None = None
    export_code_revision: str | None = None  # git commit of the exporter
    job: str | None = None  # the fine-tuning job that trained it (ftjob-…)
    training_file_sha256: str | None = None  # sha256 of the job's uploaded training file
    hyperparameters: dict[str, Any] | None = None  # as the job was given them


class Quantization(msgspec.Struct, kw_only=True):
    method: str  # e.g. "MatMulNBits" (ONNX Runtime blockwise weight-only)
    bits: int  # 4 or 8
    block_size: int  # weights per scale along the reduction axis
    symmetric: bool  # no zero points
    accuracy_level: int | None = None  # MatMulNBits compute type (4 = int8 activations)
    # where the quantized weights came from: "rtn" (round-to-nearest of the fp32 weights at
    # export) or "gguf-<kind>" (the imported file's own blocks, reproduced exactly: "gguf-q4_1")
    scheme: str = "rtn"
    formats: dict[str, int] = {}  # gguf schemes: weights per block kind, e.g. {"q4_1": 210}


class Artifact(msgspec.Struct, kw_only=True):
    target: str  # e.g. "onnx-fp32", "onnx-int4", "trt-fp16"
    flavour: str  # "ort" (contrib ops) | "portable" (standard ops) | "tensorrt" (a plan)
    runtime: str  # "onnxruntime" | "tensorrt"
    dtype: str  # activations and unquantized weights: "float32", "float16"
    entry: str  # the file the runtime opens (a path in `files`)
    files: list[FileEntry]
    max_len: int  # positions the graph's KV cache holds (prompt + generated)
    # version of the engine graph contract (inputs, outputs, cache: engine/graph.py's
    # GRAPH_VERSION); the engine refuses one it does not run
    graph_version: int = 1
    quantization: Quantization | None = None
    # TensorRT plans only: a plan runs on the TensorRT version and GPU it was built for
    trt_version: str | None = None
    gpu_arch: str | None = None  # e.g. "sm90"
    precision: str | None = None  # e.g. "fp16"
    profiles: list[dict[str, Any]] = []  # optimization profiles: input → min/opt/max shapes
    max_batch: int | None = None  # TensorRT plans: the most rows a step may hold


class PromptParity(msgspec.Struct, kw_only=True):
    prompt: str
    tokens_matched: int  # leading greedy tokens equal to eager PyTorch's
    tokens_total: int  # greedy tokens eager PyTorch produced
    first_divergence: int | None  # index of the first differing token; None = identical


class ParityReport(msgspec.Struct, kw_only=True):
    """An artifact against eager PyTorch on the same weights (exporters/parity.py)."""

    target: str
    exact: bool  # greedy decoding had to match token for token
    prompts: list[PromptParity]
    tokens_matched: int
    tokens_total: int
    max_abs_logit_diff: float  # over every prefill and decode step of the prompts
    held_out: str  # where the perplexity text came from
    held_out_tokens: int  # tokens scored
    ppl_eager: float  # the reference's: eager PyTorch on the checkpoint
    ppl_target: float  # the artifact's, on the same tokens
    ppl_increase: float  # ppl_target / ppl_eager - 1
    max_ppl_increase: float  # the limit the increase was held to
    passed: bool
    reason: str  # why it failed, or "" when it passed
    forced: bool = False  # exported although it failed (--force)
    # Teacher-forced on the held-out text, at every scored position (llama.cpp's
    # `llama-perplexity --kl-divergence` figures); None in reports written before they were
    # measured. KL(reference ‖ target) in nats over the full vocabulary, per position:
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None  # 99th percentile
    kl_max: float | None = None
    top1_agreement: float | None = None  # fraction of positions where both argmaxes agree
    positions: int = 0  # positions scored (0: not measured)
    min_top1_agreement: float | None = None  # the limit top1_agreement was held to


class Reports(msgspec.Struct, kw_only=True):
    parity: dict[str, ParityReport] = {}  # by target
    eval: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    load_test: dict[str, Any] | None = None
    # reports attached to the version after its push (Registry.attach_report), by kind, other
    # than the three above (an attached one of those replaces the field); never in the stored
    # manifest.json: the registry merges them in when it reads a version (with_attached)
    attached: dict[str, dict[str, Any]] = {}


# the attached kinds that replace a field of Reports; any other kind goes into Reports.attached
REPORT_FIELDS = ("eval", "benchmark", "load_test")


class Manifest(msgspec.Struct, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    name: str | None = None
    model: ModelSpec
    max_context: int  # the longest prompt + generation any artifact serves
    tokenizer: TokenizerSpec
    generation: GenerationDefaults = msgspec.field(default_factory=GenerationDefaults)
    lineage: Lineage = msgspec.field(default_factory=Lineage)
    created_at: datetime
    artifacts: list[Artifact] = []
    reports: Reports = msgspec.field(default_factory=Reports)

    def artifact(self, target: str) -> Artifact:
        for a in self.artifacts:
            if a.target == target:
                return a
        known = ", ".join(a.target for a in self.artifacts) or "none"
        raise ManifestError(f"the package has no target {target!r} (it has: {known})")

    def files(self) -> list[FileEntry]:
        """Every file the package lists, tokenizer first."""
        return [*self.tokenizer.files, *(f for a in self.artifacts for f in a.files)]


def with_attached(manifest: Manifest, attached: dict[str, dict[str, Any]]) -> Manifest:
    """`manifest` as the gates and the Model Library see it: reports attached after the push
    replace the manifest's own of the same kind (a re-run step's report is the current one)."""
    if not attached:
        return manifest
    fields = {k: v for k, v in attached.items() if k in REPORT_FIELDS}
    others = {k: v for k, v in attached.items() if k not in REPORT_FIELDS}
    reports = msgspec.structs.replace(
        manifest.reports, **fields, attached={**manifest.reports.attached, **others}
    )
    return msgspec.structs.replace(manifest, reports=reports)


class _Header(msgspec.Struct):
    schema_version: int


def encode(manifest: Manifest) -> bytes:
    """Pretty JSON: fields in declaration order, dict keys sorted, so equal manifests are equal bytes."""
    raw = msgspec.json.encode(manifest, order="deterministic")
    return msgspec.json.format(raw, indent=2) + b"\n"


def decode(data: bytes | str) -> Manifest:
    """Parses a manifest; raises ManifestError naming the problem (and the field, where one is bad)."""
    try:
        header = msgspec.json.decode(data, type=_Header)
    except msgspec.DecodeError as e:
        raise ManifestError(f"not a model package manifest: {e}") from None
    if header.schema_version > SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema_version {header.schema_version} is newer than this version reads "
            f"(up to {SCHEMA_VERSION}); upgrade aimass to open this package"
        )
    if header.schema_version < 1:
        raise ManifestError(f"manifest schema_version {header.schema_version} must be >= 1")
    try:
        return msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as e:
        raise ManifestError(f"invalid manifest: {e}") from None


def load(package_dir: str | Path) -> Manifest:
    path = Path(package_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{package_dir} is not a model package: it has no {MANIFEST}")
    try:
        return decode(path.read_bytes())
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def file_entry(package_dir: str | Path, path: str | Path) -> FileEntry:
    """Describes `path` (a file inside `package_dir`) with its relative path, sha256 and size."""
    full = Path(package_dir) / path
    rel = full.relative_to(package_dir).as_posix()
    return FileEntry(path=rel, sha256=sha256_file(full), size=full.stat().st_size)


def path_problem(rel: str) -> str | None:
    """Why a listed path is unsafe (absolute, "..", backslashes, empty), or None when it is fine."""
    p = PurePosixPath(rel)
    if not rel or rel != p.as_posix() or "\\" in rel:
        return f"{rel!r} is not a normalised relative path"
    if p.is_absolute():
        return f"{rel!r} is absolute"
    if ".." in p.parts:
        return f"{rel!r} leaves the package folder"
    return None


def verify(package_dir: str | Path, manifest: Manifest | None = None) -> list[str]:
    """Checks that every listed file is inside the folder with the listed size and sha256.

    Returns the problems found (empty: the package is intact). Reads the manifest when not given.
    """
    if manifest is None:
        try:
            manifest = load(package_dir)
        except ManifestError as e:
            return [str(e)]
    problems = check_files(package_dir, manifest.files())
    for a in manifest.artifacts:
        if a.entry not in {f.path for f in a.files}:
            problems.append(f"artifact {a.target}: entry {a.entry!r} is not among its files")
    return problems


def check_files(package_dir: str | Path, entries: list[FileEntry]) -> list[str]:
    """The problems with `entries` (paths that escape, missing files, wrong sizes or digests)."""
    root = Path(package_dir)
    base = root.resolve()
    problems, seen = [], set()
    for entry in entries:
        rel = entry.path
        bad = path_problem(rel)
        if bad is None and rel in seen:
            bad = f"{rel!r} is listed twice"
        seen.add(rel)
        full = root / rel
        if bad is None and not full.resolve().is_relative_to(base):
            bad = f"{rel!r} resolves outside the package folder"
        if bad is None and not full.is_file():
            bad = f"{rel} is missing"
        if bad is None and (size := full.stat().st_size) != entry.size:
            bad = f"{rel} has {size} bytes, the manifest lists {entry.size}"
        if bad is None and sha256_file(full) != entry.sha256:
            bad = f"{rel} does not match its sha256 (modified or corrupt)"
        if bad:
            problems.append(bad)
    return problems
