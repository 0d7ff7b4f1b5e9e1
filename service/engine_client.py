"""HTTP client for SGLang's own endpoints. The gateway never imports SGLang.

Transport failures become typed exceptions here, so the chat service maps them to
OpenAI errors (503, 504) in one place.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import httpx
import structlog

log = structlog.get_logger(__name__)

CHAT_PATH = "/v1/chat/completions"


class Health(StrEnum):
    OK = "ok"
    SLOW = "slow"  # accepted the connection, no answer within the probe's timeout
    DOWN = "down"  # refused, reset, or answered with an error status


class EngineUnavailable(Exception):
    """The engine could not be reached or dropped the connection."""


class EngineTimeout(Exception):
    """The engine accepted the request but stayed silent past the upstream timeout."""


class EngineHTTPError(Exception):
    def __init__(self, status_code: int, payload: Any) -> None:
        super().__init__(f"engine returned HTTP {status_code}")
        self.status_code = status_code
        self.payload = payload


class EngineClient:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        metrics_timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.read_timeout_s = read_timeout_s
        self._metrics_timeout = httpx.Timeout(metrics_timeout_s)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(
                connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Loopback traffic must never be routed through a proxy from the environment.
            trust_env=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion; returns SGLang's JSON response."""
        try:
            resp = await self._http.post(CHAT_PATH, json=body)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
            raise EngineTimeout(str(exc)) from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
        if resp.status_code != 200:
            raise EngineHTTPError(resp.status_code, _json_or_text(resp))
        try:
            return resp.json()
        except ValueError as exc:
            raise EngineHTTPError(502, {"message": "engine sent invalid JSON"}) from exc

    async def open_stream(self, body: dict[str, Any]) -> httpx.Response:
        """Send a streaming request and return once the response headers are in.

        The caller owns the returned response and must `aclose()` it.
        """
        request = self._http.build_request("POST", CHAT_PATH, json=body)
        try:
            resp = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
            raise EngineTimeout(str(exc)) from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
        if resp.status_code != 200:
            try:
                await resp.aread()
                payload = _json_or_text(resp)
            except httpx.HTTPError:
                payload = {"message": f"engine returned HTTP {resp.status_code}"}
            finally:
                await resp.aclose()
            raise EngineHTTPError(resp.status_code, payload)
        return resp

    async def abort(self, rid: str) -> bool:
        """Ask SGLang to drop a request and free its KV now."""
        try:
            resp = await self._http.post(
                "/abort_request", json={"rid": rid}, timeout=httpx.Timeout(5.0)
            )
        except httpx.HTTPError as exc:
            log.warning("engine.abort_failed", rid=rid, error=str(exc) or type(exc).__name__)
            return False
        return resp.status_code == 200

    async def probe(self, timeout_s: float) -> Health:
        """SGLang's /health runs a one-token generation and takes a second or more; a
        busy engine may answer late, which is not the same as a dead one."""
        try:
            resp = await self._http.get("/health", timeout=httpx.Timeout(timeout_s))
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                return Health.DOWN
            return Health.SLOW
        except httpx.HTTPError:
            return Health.DOWN
        return Health.OK if resp.status_code == 200 else Health.DOWN

    async def metrics_text(self) -> str | None:
        """SGLang's Prometheus exposition (needs --enable-metrics); None when unreachable."""
        try:
            resp = await self._http.get("/metrics", timeout=self._metrics_timeout)
        except httpx.HTTPError:
            return None
        return resp.text if resp.status_code == 200 else None


def _json_or_text(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {"message": resp.text[:500] or f"engine returned HTTP {resp.status_code}"}
