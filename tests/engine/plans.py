"""A package whose manifest also lists a TensorRT plan target: what the loader checks before
TensorRT itself is needed (shared by the TensorRT and graph-contract tests)."""

from __future__ import annotations

import shutil

import msgspec

from registry.manifest import MANIFEST, Artifact, decode, encode, file_entry


def with_plan_artifact(package, folder, *, trt_version="10.9.0.34", gpu_arch="sm90"):
    """A copy of `package` whose manifest also lists a trt-fp16 artifact (a file of bytes)."""
    copy = folder / "pkg"
    shutil.copytree(package, copy)
    (copy / "trt-fp16").mkdir()
    (copy / "trt-fp16" / "model.plan").write_bytes(b"not a plan")
    manifest = decode((copy / MANIFEST).read_bytes())
    plan = Artifact(
        target="trt-fp16",
        flavour="tensorrt",
        runtime="tensorrt",
        dtype="float16",
        entry="trt-fp16/model.plan",
        files=[file_entry(copy, "trt-fp16/model.plan")],
        max_len=manifest.artifacts[0].max_len,
        trt_version=trt_version,
        gpu_arch=gpu_arch,
        precision="fp16",
        max_batch=16,
    )
    manifest = msgspec.structs.replace(manifest, artifacts=[*manifest.artifacts, plan])
    (copy / MANIFEST).write_bytes(encode(manifest))
    return copy
