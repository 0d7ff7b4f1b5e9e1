"""A real Prometheus scraping a real gateway in front of a real SGLang engine.

The engine is the tiny random-weight Llama (`--load-format dummy`) with the raas backend;
the gateway runs in remote mode in this process; Prometheus (Debian's package) runs on
127.0.0.1 with a 3 s scrape interval and the alert rules of deploy/prometheus loaded.
After traffic that exercises every panel (each KV policy, streaming and not, a 400, 429s,
a client disconnect), every PromQL expression of the Grafana dashboard must return data,
every alert expression must parse and evaluate, and `promtool check metrics` must accept
the live /metrics.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.support.sglang_server import free_port, stop_process_group
from tests.support.tiny_gateway import tiny_engine_gateway
from tests.test_deploy_manifests import (
    PROMETHEUS,
    alert_rules,
    dashboard_expressions,
    known_series_names,
    metric_names,
)

pytestmark = pytest.mark.engine

MODEL = "tiny"
# What Grafana substitutes before it sends a query: the rate window, the dashboard's time
# range, the policy and namespace variables set to "All" (this Prometheus attaches no
# namespace label, as in compose) and the job variable set to this scrape job.
JOB = "raas-gateway"
GRAFANA_VARIABLES = {
    "$__rate_interval": "2m",
    "$__range": "10m",
    "$policy": ".*",
    "$namespace": ".*",
    "$job": JOB,
}
POLICIES = [
    {"name": "raas", "budget_tokens": 32},
    {"name": "streaming", "budget_tokens": 32},
    {"name": "h2o", "budget_tokens": 48, "recent_tokens": 16},
    {"name": "quest", "budget_tokens": 32},
    {"name": "dense"},
]
PROMPT = [{"role": "user", "content": "Count slowly from one to one hundred."}]


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not found: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not found on PATH (Debian package prometheus)")
    return path


@pytest.fixture(scope="module")
def gateway(bundled_model_path, tmp_path_factory) -> Iterator[str]:
    with tiny_engine_gateway(
        bundled_model_path,
        tmp_path_factory.mktemp("tiny"),
        model_name=MODEL,
        # Tiny admission limits, so that a burst of four requests meets 429s.
        max_in_flight=2,
        max_queue=0,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(gateway, tmp_path_factory) -> Iterator[str]:
    binary = need_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        # The gateway's /metrics waits up to 2 s for the engine's: a scrape timeout
        # below that (Prometheus caps it at the interval) would mark every series stale
        # whenever a loaded machine slows the engine down.
        "global": {"scrape_interval": "3s", "scrape_timeout": "3s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [gateway.removeprefix("http://")]}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        # Ready is not scraped: traffic that ends before the first scrape leaves counters
        # with no increase inside any rate() window (a fast machine finishes it in a second).
        # The gateway pre-creates this series at zero, so seeing it means one scrape is in.
        wait_for(
            lambda: has_data(url, 'raas_kv_requests_total{policy="raas"}'),
            30,
            "Prometheus never scraped the gateway",
        )
        yield url
    finally:
        stop_process_group(proc, grace_s=10)


def query(prometheus: str, promql: str) -> dict[str, Any]:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]


def has_data(prometheus: str, promql: str) -> bool:
    return bool(query(prometheus, promql)["result"])


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(url: str, kv_policy: dict[str, Any], *, stream: bool, max_tokens: int = 48) -> None:
    extra = {"kv_policy": kv_policy, "ignore_eos": True}
    if stream:
        chunks = client(url).chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        assert list(chunks)[-1].usage.completion_tokens == max_tokens
    else:
        resp = client(url).chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=max_tokens, extra_body=extra
        )
        assert resp.usage.completion_tokens == max_tokens


def gateway_metric(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_every_dashboard_and_alert_series_exists_before_traffic(prometheus) -> None:
    """Runs before `traffic` (file order; the fixture is module-scoped): a series that is
    born at its first event leaves its panels and alerts empty until then, and its first
    increment invisible to rate()."""
    used = {name for _, expr in dashboard_expressions() for name in metric_names(expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}

    def missing() -> list[str]:
        return sorted(name for name in used if not has_data(prometheus, name))

    # One scrape is in (the fixture waited for it); retried in case the engine's /metrics
    # was slow at that scrape, which leaves out only its part.
    deadline = time.monotonic() + 20
    while (absent := missing()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not absent, f"series missing before any traffic: {absent}"


@pytest.fixture(scope="module")
def traffic(gateway, prometheus) -> str:
    """Requests that put data behind every panel; returns the Prometheus URL."""
    for policy in POLICIES:
        chat(gateway, policy, stream=True)
    chat(gateway, POLICIES[0], stream=False)

    # 400: a budget below the floor.
    with pytest.raises(openai.BadRequestError):
        chat(gateway, {"name": "raas", "budget_tokens": 1}, stream=False)

    # 429: two long streams hold both slots (max_in_flight=2, no queue), a third is refused.
    held = [
        client(gateway).chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=1024,
            stream=True,
            extra_body={"kv_policy": POLICIES[0], "ignore_eos": True},
        )
        for _ in range(2)
    ]
    try:
        for stream in held:
            next(iter(stream))  # admitted and decoding
        with pytest.raises(openai.RateLimitError):
            chat(gateway, POLICIES[0], stream=False)
    finally:
        for stream in held:
            stream.close()
    assert gateway_metric(gateway, "raas_admission_rejections_total") >= 1

    # A client that goes away mid-stream: the gateway aborts the request in the engine.
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": 1024,
        "stream": True,
        "ignore_eos": True,
        "kv_policy": POLICIES[0],
    }
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 4:
                break
    wait_for(
        lambda: (
            gateway_metric(gateway, 'raas_engine_aborts_total{reason="client_disconnected"}') >= 1
        ),
        60,
        "the gateway never aborted the disconnected stream",
    )
    # Prometheus has scraped all of it, and the engine's own counters.
    wait_for(
        lambda: (
            has_data(prometheus, "raas_engine_aborts_total")
            and has_data(prometheus, "raas_admission_rejections_total")
            and has_data(prometheus, 'raas_chat_requests_total{outcome="client_disconnected"}')
        ),
        30,
        "Prometheus did not scrape the traffic",
    )
    time.sleep(3)
    return prometheus


def grafana_substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(traffic) -> None:
    def empty() -> list[str]:
        return [
            f"{title}: {expr}"
            for title, expr in dashboard_expressions()
            if not query(traffic, grafana_substitute(expr))["result"]
        ]

    # Retried for a while: one failed scrape (a starved machine) leaves instant queries
    # empty until the next one.
    deadline = time.monotonic() + 30
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)


def test_every_alert_expression_evaluates(traffic) -> None:
    for rule in alert_rules():
        query(traffic, rule["expr"])  # parses and evaluates, firing or not
        for name in metric_names(rule["expr"]):
            assert has_data(traffic, name), f"{rule['alert']}: no series {name}"

    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{traffic}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    wait_for(
        lambda: all(r["health"] != "unknown" for r in evaluated()), 30, "rules never evaluated"
    )
    loaded = evaluated()
    assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
    for rule in loaded:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    # A healthy gateway with a live engine: the availability alerts do not fire (one
    # failed scrape on a loaded machine may make them pending, never firing).
    firing = {r["name"] for r in loaded if r["state"] == "firing"}
    assert not firing & {"RaasGatewayAbsent", "RaasEngineDown"}


def test_kv_savings_show_in_prometheus(traffic) -> None:
    """raas with a 32-token budget on 48-token answers keeps less than dense would."""

    def value(promql: str) -> float:
        wait_for(lambda: has_data(traffic, promql), 30, f"no data for {promql}")
        (sample,) = query(traffic, promql)["result"]
        return float(sample["value"][1])

    assert value('raas_kv_savings_ratio{policy="raas"}') > 0.0
    assert value('raas_kv_savings_ratio{policy="dense"}') == 0.0
    assert value('sum(raas_kv_evicted_pages_total{policy="raas"})') > 0
    assert value("raas_kv_bytes_per_token") == 2 * 2 * 32 * 2 * 4  # layers*kv_heads*dim*2*fp32
    assert value("raas_engine_kv_capacity_tokens") > 0


def test_promtool_accepts_the_live_metrics(gateway, traffic) -> None:
    promtool = need_binary("promtool")
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    # The engine's gauges are part of this scrape.
    assert metric_names(text) >= {"raas_engine_up", "raas_engine_kv_usage_ratio"}
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert {n for n in metric_names(samples) if not n.endswith("_created")} <= known_series_names()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
