"""The scale-out overlay (deploy/kubernetes/overlays/gpu-scale-out), rendered and checked
offline: N engine pods behind SGLang's router, the gateway in remote mode in front.

Strict Kubernetes schemas for every built-in object; then what the shape depends on: the
engines run exactly the engine command the gateway would start itself, the router finds
exactly the engine pods and sends to their port, the gateway's engine URL is the router's
Service, and the network policies let each hop through and nothing more.
"""

from __future__ import annotations

import os
from typing import Any

import jsonschema
import pytest

from service.engine.command import EngineOptions, build_engine_command
from tests.test_deploy_manifests import CRD_SCHEMAS, K8S_VERSIONS, NON_SETTINGS_VARS, render

OVERLAY = "gpu-scale-out"
ENGINE_PORT = 30000


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in render(OVERLAY) if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    return named("Deployment", name)["spec"]["template"]["spec"]


def only_container(name: str) -> dict[str, Any]:
    (c,) = pod_spec(name)["containers"]
    return c


def arg_values(args: list[str], flag: str) -> list[str]:
    """The values after `flag`, up to the next flag."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def gateway_config() -> dict[str, str]:
    (cm,) = [
        d
        for d in render(OVERLAY)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("raas-gateway-config")
    ]
    return cm["data"]


# PodMonitor: the fields used here, strictly (the Operator's CRD is not vendored).
POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "scrapeTimeout": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_overlay_validates_strictly(k8s_version: str) -> None:
    from kubernetes_validate import utils

    version = utils.latest_version() if k8s_version == "latest" else k8s_version
    for doc in render(OVERLAY):
        assert doc["metadata"].get("namespace", "raas") == "raas", doc["metadata"]["name"]
        if doc["kind"] == "PodMonitor":
            jsonschema.validate(doc, POD_MONITOR_SCHEMA)
        elif doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from None


def test_engines_run_the_gateways_own_engine_command() -> None:
    """The engine pods' flags are the ones `raas-serve serve` gives its embedded engine
    for the gpu overlay's settings: no drift between the two shapes."""
    engine = only_container("raas-engine")
    assert engine["command"] == ["tini", "--", "python3", "-m", "sglang.launch_server"]
    gpu = gateway_config()
    served = arg_values(engine["args"], "--served-model-name")
    expected = build_engine_command(
        EngineOptions(
            model_path=gpu["RAAS_MODEL_PATH"],
            host="0.0.0.0",
            port=ENGINE_PORT,
            device="cuda",
            attention_backend=gpu["RAAS_ENGINE_ATTENTION_BACKEND"],
            dtype=gpu["RAAS_ENGINE_DTYPE"],
            max_total_tokens=int(gpu["RAAS_ENGINE_MAX_TOTAL_TOKENS"]),
            extra_args=("--served-model-name", *served),
        )
    )[3:]  # python -m sglang.launch_server
    extra = ["--mem-fraction-static", "0.85", "--reasoning-parser", "deepseek-r1"]
    assert sorted(engine["args"]) == sorted(expected + extra)
    assert served == [gpu["RAAS_MODEL_NAME"]]
    assert engine["ports"][0]["containerPort"] == ENGINE_PORT
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert engine["startupProbe"]["httpGet"]["path"] == "/health_generate"


def test_router_discovers_exactly_the_engine_pods() -> None:
    router = only_container("raas-router")
    args = router["args"]
    assert router["command"][-2:] == ["smg", "launch"]
    assert "--service-discovery" in args
    selector = dict(s.split("=", 1) for s in arg_values(args, "--selector"))
    engine_labels = named("Deployment", "raas-engine")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= engine_labels.items()
    for other in ("raas-gateway", "raas-router"):
        labels = named("Deployment", other)["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= labels.items(), other
    assert arg_values(args, "--service-discovery-port") == [str(ENGINE_PORT)]
    # Discovery watches its own namespace (a Role, not a ClusterRole, allows it).
    assert arg_values(args, "--service-discovery-namespace") == ["$(POD_NAMESPACE)"]
    (env,) = router["env"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    role = named("Role", "raas-router")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = named("RoleBinding", "raas-router")
    assert binding["subjects"][0]["name"] == pod_spec("raas-router")["serviceAccountName"]
    assert arg_values(args, "--policy") == ["least_load"]
    # A router rollout lets the streams it relays finish within the pod's grace period.
    grace = int(arg_values(args, "--shutdown-grace-period-secs")[0])
    assert grace < pod_spec("raas-router")["terminationGracePeriodSeconds"]
    assert grace <= int(arg_values(args, "--request-timeout-secs")[0])


def test_gateway_sends_to_the_router_service(monkeypatch) -> None:
    from service.server.settings import Settings

    data = gateway_config()
    for name in list(os.environ):
        if name.startswith("RAAS_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        if name.startswith("RAAS_") and name not in NON_SETTINGS_VARS:
            assert name[5:].lower() in Settings.model_fields, f"{name} is no setting"
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.engine_mode == "remote"
    service = named("Service", "raas-router")
    (port,) = service["spec"]["ports"]
    assert settings.engine_url == f"http://{service['metadata']['name']}:{port['port']}"
    router_labels = named("Deployment", "raas-router")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= router_labels.items()
    # The gateway pod no longer holds a GPU.
    gateway = only_container("raas-gateway")
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in gateway["resources"][part]


def peers(rule: dict[str, Any]) -> set[str]:
    return {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in rule.get("from", rule.get("to", []))
        if "podSelector" in p
    }


def test_network_policies_open_each_hop_and_no_more() -> None:
    gateway = named("NetworkPolicy", "raas-gateway")["spec"]
    assert any(
        peers(r) == {"router", "engine"}
        and r["ports"] == [{"port": ENGINE_PORT, "protocol": "TCP"}]
        for r in gateway["egress"]
    )
    engine = named("NetworkPolicy", "raas-engine")["spec"]
    (ingress,) = engine["ingress"]
    assert peers(ingress) == {"router", "gateway"}
    assert ingress["ports"] == [{"port": "engine", "protocol": "TCP"}]
    router = named("NetworkPolicy", "raas-router")["spec"]
    api = [r for r in router["ingress"] if r["ports"][0]["port"] == "http"]
    assert [peers(r) for r in api] == [{"gateway"}]
    assert any(peers(r) == {"engine"} for r in router["egress"])
