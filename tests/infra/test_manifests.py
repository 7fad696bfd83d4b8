"""infra/k8s: every overlay renders with `kubectl kustomize`, and every rendered document is
valid: built-in kinds against Kubernetes' own schemas (kubernetes-validate, strict, the pinned
version), custom resources against infra/k8s/schemas. Then the facts the pieces must agree on:
references to ConfigMaps and Secrets, the gateway's --remote and the engine StatefulSet, the
images, non-root pods, and the Prometheus scrape config against the pods it scrapes.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("dev", "prod")
# the Kubernetes version the manifests target (kubectl's own minor version here)
K8S_VERSION = "1.32.0"
# custom resources and their vendored schema
CRD_SCHEMAS = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org-v1-pytorchjob.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
}
# created out of band in production (docs/operations.md), never rendered
EXTERNAL_SECRETS = {"prod": {"aimass-secrets"}}
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: the overlays cannot be rendered"
)


def render(overlay: str) -> list[dict]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered")
    return request.param, render(request.param)


# ── schemas ──


def _k8s_definitions() -> Resource:
    version_dir = f"v{K8S_VERSION}-local-strict"
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / version_dir
    return Resource.from_contents(json.loads((path / "_definitions.json").read_text()))


_REGISTRY: Registry | None = None


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _k8s_definitions() @ Registry()
    name = CRD_SCHEMAS[(api_version, kind)]
    schema = json.loads((K8S / "schemas" / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=_REGISTRY)


def problems(doc: dict) -> list[str]:
    """Why `doc` is not a valid resource; empty when it is."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    where = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        errors = crd_validator(*key).iter_errors(doc)
        return [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {key[0]} {key[1]}: add one to infra/k8s/schemas"]
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'/'.join(map(str, e.path))}: {e.message}"]
    return []


@needs_kubectl
def test_every_rendered_document_is_valid(overlay):
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    # what the platform is made of: a wrong patch that drops a piece fails here
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ScaledObject", "PyTorchJob", "Service", "ConfigMap"} <= kinds, kinds  # fmt: skip
    found = [p for d in docs for p in problems(d)]
    assert not found, f"overlay {name}:\n" + "\n".join(found)


def _by_kind(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_validators_reject_what_the_cluster_would():
    """Each validator fails a broken copy of a resource, so a pass above means something."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered")
    docs = render("dev")
    gateway = _by_kind(docs, "Deployment", "aimass-gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in p for p in problems(gateway))

    job = _by_kind(docs, "PyTorchJob", "aimass-train")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "x"
    assert problems(job)
    job = _by_kind(render("dev"), "PyTorchJob", "aimass-train")
    job["spec"]["pytorchReplicaSpecs"]["Chief"] = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert problems(job)
    job = _by_kind(render("dev"), "PyTorchJob", "aimass-train")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 1}  # not a quantity
    assert problems(job)

    scaled = _by_kind(docs, "ScaledObject", "aimass-engine")
    del scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert any("query" in p for p in problems(scaled))
    assert problems({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


# ── what the pieces must agree on ──


def _pod_specs(docs: list[dict]):
    """(resource, pod spec) of every workload, custom ones included."""
    for d in docs:
        spec = d.get("spec", {})
        if "template" in spec:
            yield d, spec["template"]["spec"]
        for replica in spec.get("pytorchReplicaSpecs", {}).values():
            yield d, replica["template"]["spec"]


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@needs_kubectl
def test_config_and_secret_references_resolve(overlay):
    name, docs = overlay
    data = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            data[("ConfigMap", d["metadata"]["name"])] = set(d.get("data", {}))
        if d["kind"] == "Secret":
            keys = set(d.get("data", {})) | set(d.get("stringData", {}))
            data[("Secret", d["metadata"]["name"])] = keys
            for value in d.get("data", {}).values():
                base64.b64decode(value, validate=True)
    external = EXTERNAL_SECRETS.get(name, set())
    missing = []
    for d, pod in _pod_specs(docs):
        for c in _containers(pod):
            refs = [("ConfigMap", e["configMapRef"]["name"], None, False)
                    for e in c.get("envFrom", []) if "configMapRef" in e]  # fmt: skip
            for e in c.get("env", []):
                source = e.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in source:
                        ref = source[field]
                        refs.append((kind, ref["name"], ref["key"], ref.get("optional", False)))
            for kind, ref_name, key, optional in refs:
                if kind == "Secret" and ref_name in external:
                    continue
                keys = data.get((kind, ref_name))
                if keys is None:
                    missing.append(f"{d['metadata']['name']}/{c['name']}: {kind} {ref_name}")
                elif key is not None and key not in keys and not optional:
                    missing.append(f"{d['metadata']['name']}/{c['name']}: {kind} {ref_name}[{key}]")
    assert not missing, f"overlay {name}: unresolved references:\n" + "\n".join(missing)


def _config(docs: list[dict]) -> dict[str, str]:
    return _by_kind(docs, "ConfigMap", "aimass-config")["data"]


@needs_kubectl
def test_gateway_remote_lists_every_engine_server_the_scaler_may_start(overlay):
    name, docs = overlay
    config = _config(docs)
    engine = _by_kind(docs, "StatefulSet", "aimass-engine")
    service = _by_kind(docs, "Service", engine["spec"]["serviceName"])
    scaled = _by_kind(docs, "ScaledObject", "aimass-engine")
    gateway = _by_kind(docs, "Deployment", "aimass-gateway")

    assert service["spec"]["clusterIP"] == "None", "per-pod DNS names need a headless Service"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "aimass-engine"
    }  # fmt: skip
    assert scaled["spec"]["minReplicaCount"] == 0
    port = service["spec"]["ports"][0]["port"]
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert f"--port={port}" in container["args"]

    model, _, addresses = config["AIMASS_ENGINE_REMOTE"].partition("=")
    sts, svc = engine["metadata"]["name"], service["metadata"]["name"]
    expected = [f"{sts}-{i}.{svc}:{port}" for i in range(scaled["spec"]["maxReplicaCount"])]
    assert addresses.split(",") == expected, f"overlay {name}"
    # the engine pods pull the model the gateway sends to them
    assert re.split("[@:]", config["AIMASS_ENGINE_MODEL"])[0] == model
    for trigger in scaled["spec"]["triggers"]:
        assert f'model=~"{model}(' in trigger["metadata"]["query"], trigger["name"]
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--remote=$(AIMASS_ENGINE_REMOTE)" in args and "--workers=0" in args


@needs_kubectl
def test_autoscaled_workloads_leave_the_count_to_their_scaler(overlay):
    """A `replicas` in the manifest would reset the scaler's count on every apply."""
    name, docs = overlay
    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(scalers) == 2
    for scaler in scalers:
        ref = scaler["spec"]["scaleTargetRef"]
        target = _by_kind(docs, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], f"{name}: {ref['kind']}/{ref['name']}"


@needs_kubectl
def test_images_are_mapped_and_pods_run_as_non_root(overlay):
    name, docs = overlay
    for d, pod in _pod_specs(docs):
        for c in _containers(pod):
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{name}: {c['name']} image {image} has no tag"
            assert not image.startswith("aimass-compute"), f"{name}: unmapped image {image}"
            if not re.match(r"(.*/)?aimass:", image):
                continue  # dev's backing services run their upstream images
            assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
            assert pod["securityContext"]["runAsUser"] == 10001, d["metadata"]["name"]
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]


@needs_kubectl
def test_training_runs_the_trainer_under_torchrun(overlay):
    _, docs = overlay
    job = _by_kind(docs, "PyTorchJob", "aimass-train")
    assert job["spec"]["runPolicy"]["suspend"] is True, "applying the platform must not train"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        container = replica["template"]["spec"]["containers"][0]
        script = container["args"][0]
        words = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
        assert words[0] == "torchrun" and words[words.index("-m") + 1 : words.index("-m") + 3] == [
            "aimass_cli", "train"
        ]  # fmt: skip
        for variable in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "MASTER_ADDR"):
            assert f"${variable}" in script


@needs_kubectl
def test_prometheus_scrapes_the_gateway_pods(overlay):
    _, docs = overlay
    config = yaml.safe_load((ROOT / "infra" / "observability" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "aimass-gateway")
    deployment = _by_kind(docs, "Deployment", "aimass-gateway")
    namespaces = job["kubernetes_sd_configs"][0]["namespaces"]["names"]
    assert deployment["metadata"]["namespace"] in namespaces
    keep = next(r for r in job["relabel_configs"] if r["action"] == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    gateway = deployment["spec"]["template"]
    annotations = gateway["metadata"]["annotations"]
    assert re.fullmatch(keep["regex"], annotations["prometheus.io/scrape"])
    ports = [p["containerPort"] for p in gateway["spec"]["containers"][0]["ports"]]
    assert int(annotations["prometheus.io/port"]) in ports
    assert annotations["prometheus.io/path"] == "/metrics"
