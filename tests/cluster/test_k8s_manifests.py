"""The KubeRay manifests: valid against the pinned CRD schema, and safe as written.

The schema (``deploy/k8s/schema/kuberay-crd-subset.json``) is the KubeRay
CRD's own schema of every field the manifests use, closed to others; see
``deploy/k8s/schema/derive.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath

import jsonschema  # a dependency of ray itself, so no extra package
import pytest
import yaml

from cluster.config import ClusterConfig, is_loopback, load_config
from worker_common.worker_config import AUTO_HOST

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCHEMA = json.loads((DEPLOY / "k8s" / "schema" / "kuberay-crd-subset.json").read_text())
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def ray_docs() -> list[tuple[str, dict]]:
    return [(f"{name}:{d['kind']}", d) for name in MANIFESTS for d in docs(name) if d["kind"] in SCHEMA["kinds"]]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) of the head and of every worker group."""
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def validate(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA["kinds"][doc["kind"]])


@pytest.mark.parametrize(("where", "doc"), ray_docs(), ids=[w for w, _ in ray_docs()])
def test_manifests_match_the_pinned_kuberay_schema(where, doc):
    validate(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: cluster_spec(d)["headGroupSpec"].update(rayStartParam={}),  # misspelt field
    lambda d: cluster_spec(d)["workerGroupSpecs"][0].update(replicas="3"),  # a string, not an int
    lambda d: cluster_spec(d)["authOptions"].update(mode="tokens"),  # not in the enum
    lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),  # required
    lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["volumes"][1]["secret"].update(defaultMode="0440"),
], ids=["typo", "type", "enum", "required", "mode-as-string"])
def test_the_schema_refuses_broken_manifests(mutate):
    for _, doc in ray_docs():
        bad = copy.deepcopy(doc)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


@pytest.mark.parametrize(("where", "doc"), ray_docs(), ids=[w for w, _ in ray_docs()])
def test_ray_token_auth_is_on_everywhere(where, doc):
    spec = cluster_spec(doc)
    # authOptions: the operator polls the dashboard and the RayJob submitter submits with the token.
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    for group, _pod, c in ray_containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", group
        token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") or env.get("RAY_AUTH_TOKEN_PATH")
        assert token, f"{group}: no Ray token"
        assert token["name"] == spec["authOptions"]["secretName"] and token["key"] == "auth_token"
        assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]["value"] == "1", group  # not the one-machine loopback mode


@pytest.mark.parametrize(("where", "doc"), ray_docs(), ids=[w for w, _ in ray_docs()])
def test_serving_secrets_are_files_on_the_head_only(where, doc):
    config_secrets = {"splitserve-secrets", "splitserve-tls"}
    for group, pod, c in ray_containers(doc):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            assert ref.get("name") not in config_secrets, f"{group}: {e['name']} puts a serving secret in the environment"
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") in config_secrets}
        mounted = {m["name"] for m in c.get("volumeMounts", [])}
        if group == "head":
            assert secret_volumes == mounted & secret_volumes and len(secret_volumes) == 2
            assert all(v["secret"]["defaultMode"] & 0o007 == 0 for v in pod["volumes"] if v["name"] in secret_volumes)
        else:
            assert not secret_volumes, f"{group}: workers need no serving secret"
        ports = {p["containerPort"] for p in c.get("ports", [])}
        assert 9464 not in ports, f"{group}: /metrics is loopback-only and must not be published"


def head_mounts(doc: dict) -> list[PurePosixPath]:
    (head,) = [c for g, _p, c in ray_containers(doc) if g == "head"]
    return [PurePosixPath(m["mountPath"]) for m in head.get("volumeMounts", [])]


def check_served_config(cfg: ClusterConfig, mounts: list[PurePosixPath]) -> None:
    rc, kv = cfg.router, cfg.kvtransfer
    assert not is_loopback(rc.host) and rc.token_set and rc.tls_set  # reachable, so token + TLS
    assert is_loopback(rc.metrics_host)  # /metrics private
    assert kv.host == AUTO_HOST  # each node advertises its own address
    # Secrets from files, never from the head's environment.
    assert rc.auth_token_env is None and kv.secret_env is None
    for path in (rc.auth_token_file, kv.secret_file, rc.tls_cert, rc.tls_key):
        assert path is not None and any(PurePosixPath(path).is_relative_to(m) for m in mounts), path


def test_gpu_yaml_and_its_configmap_are_served_safely():
    (job,) = [d for d in docs("rayjob.yaml") if d["kind"] == "RayJob"]
    (cm,) = [d for d in docs("rayjob.yaml") if d["kind"] == "ConfigMap"]
    (cluster,) = [d for d in docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    check_served_config(load_config(cm["data"]["gpu.yaml"]), head_mounts(job))
    check_served_config(load_config(DEPLOY / "gpu.yaml"), head_mounts(cluster))
    assert job["spec"]["entrypoint"].endswith("--config /app/deploy/gpu.yaml")


def test_the_router_service_publishes_only_the_router_ports():
    (svc,) = [d for d in docs("raycluster.yaml") if d["kind"] == "Service"]
    rc = load_config(DEPLOY / "gpu.yaml").router
    assert [p["port"] for p in svc["spec"]["ports"]] == [rc.port, rc.http_port]  # gRPC and the OpenAI HTTP API
