"""The gateway's log output: one JSON object per line, from structlog and from the
standard library alike, with an access line per HTTP request.

Runs in a subprocess: logging configuration is process-wide state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging
import structlog
from fastapi.testclient import TestClient
from service.app import create_app
from service.server.log_config import configure_logging
from service.server.settings import Settings

configure_logging("info", json_logs=True)
app = create_app(Settings(engine_mode="remote", engine_url="http://127.0.0.1:9"))
with TestClient(app) as client:
    assert client.get("/health/live?probe=1").status_code == 200
    headers = {"content-type": "application/json"}
    assert client.post("/v1/chat/completions", content=b"{", headers=headers).status_code == 422
logging.getLogger("uvicorn.error").info("from the standard library")
structlog.get_logger("test").debug("below the level")
try:
    1 / 0
except ZeroDivisionError:
    structlog.get_logger("test").exception("boom")
"""


def test_logs_are_json_lines_with_an_access_line_per_request():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    for line in lines:
        assert {"event", "level", "logger", "timestamp"} <= set(line), line
        assert line["timestamp"].endswith("Z")
    access = [line for line in lines if line["event"] == "http.request"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/health/live", 200),
        ("POST", "/v1/chat/completions", 422),
    ]
    assert all(a["logger"] == "service.access" and a["ms"] >= 0 for a in access)
    assert [a["query"] for a in access] == ["probe=1", None]
    assert all(a["http_version"] == "1.1" for a in access)
    assert any(
        line["event"] == "gateway.started" and line["logger"] == "service.app" for line in lines
    )
    stdlib = [line for line in lines if line["logger"] == "uvicorn.error"]
    assert [line["event"] for line in stdlib] == ["from the standard library"]
    assert not any(line["event"] == "below the level" for line in lines)
    (boom,) = [line for line in lines if line["event"] == "boom"]
    assert boom["level"] == "error" and "ZeroDivisionError" in boom["exception"]
