"""The model package manifest: round trip, schema evolution, and verification of the files."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from registry.manifest import (
    SCHEMA_VERSION,
    Artifact,
    FileEntry,
    Lineage,
    Manifest,
    ManifestError,
    ParityReport,
    PromptParity,
    Quantization,
    Reports,
    TokenizerSpec,
    decode,
    encode,
    file_entry,
    load,
    verify,
)
from tests.registry.helpers import TINY_SPEC


def make_package(root) -> Manifest:
    """A package folder with a tokenizer file and one two-file artifact, and its manifest."""
    (root / "onnx-int4").mkdir(parents=True)
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "onnx-int4" / "model.onnx").write_bytes(b"graph" * 10)
    (root / "onnx-int4" / "model.onnx.data").write_bytes(bytes(range(256)) * 4)
    files = [
        file_entry(root, "onnx-int4/model.onnx"),
        file_entry(root, "onnx-int4/model.onnx.data"),
    ]
    manifest = Manifest(
        name="tiny",
        model=TINY_SPEC,
        max_context=64,
        tokenizer=TokenizerSpec(
            files=[file_entry(root, "tokenizer.json")],
            eos_token="<|endoftext|>",
            eos_id=0,
            stop_tokens=["<|endoftext|>", "<|im_end|>"],
            stop_ids=[0, 2],
        ),
        lineage=Lineage(dataset_sha256="ab" * 32, checkpoint_step=30),
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        artifacts=[
            Artifact(
                target="onnx-int4",
                flavour="ort",
                runtime="onnxruntime",
                dtype="float32",
                entry="onnx-int4/model.onnx",
                files=files,
                max_len=64,
                quantization=Quantization(
                    method="MatMulNBits", bits=4, block_size=32, symmetric=True, accuracy_level=4
                ),
            )
        ],
        reports=Reports(
            parity={
                "onnx-int4": ParityReport(
                    target="onnx-int4",
                    exact=False,
                    prompts=[
                        PromptParity(
                            prompt="The", tokens_matched=5, tokens_total=8, first_divergence=5
                        )
                    ],
                    tokens_matched=5,
                    tokens_total=8,
                    max_abs_logit_diff=0.25,
                    held_out="built-in",
                    held_out_tokens=100,
                    ppl_eager=10.0,
                    ppl_target=10.2,
                    ppl_increase=0.02,
                    max_ppl_increase=0.05,
                    passed=True,
                    reason="",
                )
            }
        ),
    )
    (root / "manifest.json").write_bytes(encode(manifest))
    return manifest


def test_round_trip_is_exact_and_stable(tmp_path):
    manifest = make_package(tmp_path)
    data = encode(manifest)
    assert decode(data) == manifest
    assert encode(decode(data)) == data  # same manifest, same bytes
    assert load(tmp_path) == manifest
    text = data.decode()
    assert text.startswith('{\n  "schema_version": 1,')  # pretty, declaration order
    assert json.loads(text)["artifacts"][0]["quantization"]["bits"] == 4


def test_newer_minor_fields_are_ignored_and_older_manifests_get_defaults(tmp_path):
    data = json.loads(encode(make_package(tmp_path)))
    data["future_top_level"] = {"anything": [1, 2]}
    data["model"]["sliding_window"] = 4096
    data["artifacts"][0]["kv_dtype"] = "fp8"
    assert decode(json.dumps(data)).model.dim == 32
    for optional in ("name", "generation", "lineage", "reports", "artifacts"):
        del data[optional]
    old = decode(json.dumps(data))
    assert old.name is None and old.artifacts == [] and old.reports.parity == {}
    assert old.generation.stop_ids == [] and old.lineage.run is None


def test_newer_major_schema_is_refused(tmp_path):
    data = json.loads(encode(make_package(tmp_path)))
    data["schema_version"] = SCHEMA_VERSION + 1
    data["model"] = "a shape this version cannot read"
    with pytest.raises(ManifestError, match=r"schema_version 2 is newer .* reads \(up to 1\)"):
        decode(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"].update(dim="32"), r"Expected `int`, got `str` - at `\$.model.dim`"),
        (lambda d: d.pop("tokenizer"), "missing required field `tokenizer`"),
    ],
)
def test_decode_errors_name_the_field(tmp_path, edit, message):
    data = json.loads(encode(make_package(tmp_path)))
    edit(data)
    with pytest.raises(ManifestError, match=message):
        decode(json.dumps(data))


def test_decode_rejects_what_is_not_a_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a model package manifest"):
        decode(b"{not json")
    with pytest.raises(ManifestError, match="has no manifest.json"):
        load(tmp_path)


def test_verify_passes_an_intact_package(tmp_path):
    make_package(tmp_path)
    assert verify(tmp_path) == []


def test_verify_catches_a_modified_file(tmp_path):
    make_package(tmp_path)
    data = tmp_path / "onnx-int4" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1  # same size, one bit flipped
    data.write_bytes(bytes(raw))
    assert verify(tmp_path) == [
        "onnx-int4/model.onnx.data does not match its sha256 (modified or corrupt)"
    ]


def test_verify_catches_a_missing_file_and_a_size_mismatch(tmp_path):
    make_package(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with open(tmp_path / "onnx-int4" / "model.onnx", "ab") as f:
        f.write(b"!")
    assert verify(tmp_path) == [
        "tokenizer.json is missing",
        "onnx-int4/model.onnx has 51 bytes, the manifest lists 50",
    ]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../outside.bin", "leaves the package folder"),
        ("onnx-int4/../../outside.bin", "leaves the package folder"),
        ("onnx-int4/./model.onnx", "not a normalised relative path"),
        ("/etc/hostname", "is absolute"),
        ("onnx-int4\\model.onnx", "not a normalised relative path"),
        ("link.bin", "resolves outside the package folder"),
    ],
)
def test_verify_rejects_paths_that_escape_the_folder(tmp_path, path, problem):
    root = tmp_path / "pkg"
    manifest = make_package(root)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (root / "link.bin").symlink_to(outside)
    manifest.artifacts[0].files.append(FileEntry(path=path, sha256="0" * 64, size=6))
    problems = verify(root, manifest)
    assert len(problems) == 1 and problem in problems[0]


def test_verify_checks_the_entry_is_listed(tmp_path):
    manifest = make_package(tmp_path)
    manifest.artifacts[0].entry = "onnx-int4/other.onnx"
    assert verify(tmp_path, manifest) == [
        "artifact onnx-int4: entry 'onnx-int4/other.onnx' is not among its files"
    ]


def test_artifact_lookup_names_the_known_targets(tmp_path):
    manifest = make_package(tmp_path)
    assert manifest.artifact("onnx-int4").quantization.bits == 4
    with pytest.raises(ManifestError, match=r"no target 'onnx-fp32' \(it has: onnx-int4\)"):
        manifest.artifact("onnx-fp32")
