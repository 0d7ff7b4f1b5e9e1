"""The run, as one validated pydantic model: what the CLI builds and the library takes."""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loadtest.prompts import load_prompt_set


class Slo(BaseModel):
    """Latency objectives for goodput, in milliseconds (bench_serving's `--goodput` keys)."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2el_ms: float | None = Field(default=None, gt=0)

    def as_dict(self) -> dict[str, float]:
        """The objectives that are set, keyed like bench_serving: ttft, tpot, e2el."""
        values = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2el_ms}
        return {name: value for name, value in values.items() if value is not None}


class PolicyChoice(BaseModel):
    """One entry of the per-request `kv_policy` mix; `kv_policy=None` sends no extension."""

    model_config = ConfigDict(extra="forbid")

    kv_policy: dict[str, Any] | None = None
    weight: float = Field(default=1.0, gt=0)

    @property
    def label(self) -> str:
        if self.kv_policy is None:
            return "default"
        name = str(self.kv_policy.get("name", "default"))
        budget = self.kv_policy.get("budget_tokens")
        return name if budget is None else f"{name}/{budget}"

    @classmethod
    def parse(cls, text: str) -> PolicyChoice:
        """`default`, `raas` or `name=raas,budget_tokens=256,alpha=0.1`, then `@weight`.

        The key=value form is the gateway's X-KV-Policy header syntax; a bare first item
        is the policy name.
        """
        spec, _, weight = text.partition("@")
        spec = spec.strip()
        policy: dict[str, Any] | None = None
        if spec and spec != "default":
            policy = {}
            for i, item in enumerate(part.strip() for part in spec.split(",")):
                key, sep, value = item.partition("=")
                if not sep:
                    if i != 0:
                        raise ValueError(f"expected key=value in policy {text!r}, got {item!r}")
                    key, value = "name", key
                policy[key.strip()] = _scalar(value.strip())
        return cls(kv_policy=policy, weight=float(weight) if weight else 1.0)


def _scalar(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoadConfig(BaseModel):
    """Everything a run needs. Runs are bounded by `num_requests` and `duration_s`."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = "http://127.0.0.1:8000"
    model: str = "smollm2-135m-instruct"
    api_key: str | None = None
    allow_remote: bool = False

    mode: Literal["closed", "open"] = "closed"
    # Closed loop: the number of clients, each sending its next request when the last
    # one ends. Open loop: a cap on outstanding requests (bench_serving's
    # --max-concurrency); arrivals beyond it wait for a slot.
    concurrency: int = Field(default=8, ge=1, le=4096)
    request_rate: float | None = Field(default=None, gt=0)
    num_requests: int = Field(default=100, ge=1)
    duration_s: float = Field(default=60.0, gt=0)
    # After the duration no request is sent; those in flight get this long to end, then
    # they are cancelled (and reported as `cancelled`).
    drain_timeout_s: float = Field(default=30.0, ge=0)
    request_timeout_s: float = Field(default=300.0, gt=0)
    # A client that got a 429 waits Retry-After before its next request (closed loop).
    honor_retry_after: bool = True

    prompt_set: str = "short"
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    ignore_eos: bool = False
    policies: list[PolicyChoice] = Field(default_factory=lambda: [PolicyChoice()], min_length=1)
    slo: Slo = Field(default_factory=Slo)
    seed: int = 0

    @field_validator("base_url")
    @classmethod
    def _strip_url(cls, value: str) -> str:
        value = value.rstrip("/").removesuffix("/v1")
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value

    @field_validator("prompt_set")
    @classmethod
    def _known_prompt_set(cls, value: str) -> str:
        load_prompt_set(value)  # raises ValueError naming the sets when it is neither
        return value

    @model_validator(mode="after")
    def _check(self) -> LoadConfig:
        if self.mode == "open" and self.request_rate is None:
            raise ValueError("expected request_rate for an open-loop run, got none")
        if not self.allow_remote and not is_loopback_url(self.base_url):
            raise ValueError(
                f"expected a loopback target (127.0.0.0/8, ::1, localhost), got "
                f"{self.base_url!r}; pass allow_remote (--allow-remote) to load a remote server"
            )
        return self

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    def public_dump(self) -> dict[str, Any]:
        """The config for reports, without the API key."""
        data = self.model_dump(mode="json")
        if data.get("api_key"):
            data["api_key"] = "***"
        return data
