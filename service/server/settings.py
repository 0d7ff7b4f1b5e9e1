"""Gateway configuration: one typed class, read from `RAAS_*` environment variables.

Every knob of the gateway lives here with its validation, so `raas-serve`, the tests and
a Kubernetes manifest configure the same object. List fields take JSON in the
environment (`RAAS_ENGINE_EXTRA_ARGS='["--log-level", "warning"]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from raas_backend import policy_spec as spec
from raas_backend.policy_spec import POLICY_NAMES, PolicyName

EngineMode = Literal["embedded", "remote"]
DEFAULT_MAX_TOKENS = 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAAS_", extra="ignore")

    # --- the gateway's own socket (used by `raas-serve serve`) ---
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # A connection must deliver a complete request head this soon after connecting (or
    # after its previous response), and then the whole body within the body timeout;
    # else 408 and the connection is closed. Slow or half-open clients hold nothing.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_body_timeout_s: float = Field(default=30.0, gt=0)

    # --- the model ---
    model_name: str = Field(default="smollm2-135m-instruct", min_length=1)
    # None serves the bundled model (converted on first use); a path replaces it. In remote
    # mode the path is only read for config.json (bytes per KV token).
    model_path: str | None = None

    # --- the engine ---
    engine_mode: EngineMode = "embedded"
    # Remote mode: where SGLang listens. Embedded mode derives its URL from host/port.
    engine_url: str = "http://127.0.0.1:30000"
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(default=30000, ge=1, le=65535)
    # `raas` serves every kv_policy (dense included); torch_native is stock dense SGLang.
    engine_attention_backend: str = "raas"
    engine_dtype: str = "auto"
    engine_device: str = "auto"
    engine_max_total_tokens: int | None = Field(default=16384, ge=1)
    engine_extra_args: list[str] = Field(default_factory=list)
    # SGLang's --sleep-on-idle; None: on for the CPU only (see EngineOptions).
    engine_sleep_on_idle: bool | None = None
    # None: the engine inherits the gateway's stdout/stderr (what containers want).
    engine_log_file: Path | None = None
    engine_start_timeout_s: float = Field(default=600.0, gt=0)
    engine_restart_backoff_s: float = Field(default=1.0, gt=0)
    engine_restart_backoff_max_s: float = Field(default=60.0, gt=0)
    # Each probe round asks SGLang's HTTP front end, then its scheduler (a one-token
    # generation, which costs a forward on an idle engine): probe gently.
    engine_health_interval_s: float = Field(default=5.0, gt=0)
    engine_health_timeout_s: float = Field(default=10.0, gt=0)
    # Consecutive failed probe rounds before a live engine counts as unhealthy; embedded
    # mode then restarts it. A refused connection makes it unready at once.
    engine_unhealthy_threshold: int = Field(default=3, ge=1)
    # A scheduler that does not answer the generation probe is busy, not hung, while
    # requests are in flight and one of them showed progress within this long (a long
    # prefill sends nothing until it ends). The same silence gets a request its 504.
    engine_stall_timeout_s: float = Field(default=600.0, gt=0)
    # Retry-After of a 503 while the engine is starting, restarting or unreachable.
    engine_retry_after_s: int = Field(default=5, ge=1)
    engine_stop_grace_s: float = Field(default=15.0, gt=0)
    engine_metrics_timeout_s: float = Field(default=2.0, gt=0)

    # --- upstream HTTP ---
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest silence from the engine: the whole answer for non-streaming requests, the gap
    # between two chunks for streaming ones. Past it the client gets a 504.
    upstream_timeout_s: float = Field(default=600.0, gt=0)
    upstream_max_connections: int = Field(default=1024, ge=1)

    # --- shutdown ---
    # On SIGTERM the gateway refuses new requests (503) and waits this long for in-flight
    # ones to finish before it stops; 0 stops at once. Keep it below the orchestrator's
    # kill deadline (Kubernetes terminationGracePeriodSeconds).
    drain_timeout_s: float = Field(default=30.0, ge=0)

    # --- request limits ---
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    # Cap on max_tokens / max_completion_tokens a client may ask for.
    max_tokens_limit: int = Field(default=4096, ge=1)
    # Sent when the client asks for no limit (an API key may set its own); where the prompt
    # leaves less room in the context, the engine gets what is left. None leaves it to the
    # engine, which then writes until EOS or the context length: minutes on a CPU.
    default_max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    max_n: int = Field(default=8, ge=1)
    # Whether the engine samples by a request's `seed`. SGLang does only when started with
    # --enable-deterministic-inference, which it refuses for the raas attention backend;
    # otherwise a seed is a 400, never silently ignored. True for a remote engine that
    # runs deterministic inference.
    engine_honours_seed: bool = False

    # --- admission control ---
    max_in_flight: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)
    queue_timeout_s: float = Field(default=60.0, gt=0)
    retry_after_s: int = Field(default=1, ge=1)
    # Applies to keys that set no `max_concurrency` of their own; None is unlimited.
    per_key_max_concurrency: int | None = Field(default=None, ge=1)

    # --- auth: no keys configured means auth is off ---
    api_keys_file: Path | None = None
    # Comma-separated bearer keys without per-key limits (for a Kubernetes secret).
    api_keys: SecretStr | None = None

    # --- KV policy defaults and server caps ---
    kv_allowed_policies: list[PolicyName] = Field(default_factory=lambda: list(POLICY_NAMES))
    # The defaults are the engine's (raas_backend/policy_spec.py), so a request reads the
    # same through the gateway as sent to SGLang directly.
    kv_default_policy: PolicyName = spec.DEFAULT_POLICY
    kv_default_budget_tokens: int = spec.DEFAULT_BUDGET_TOKENS
    kv_default_alpha: float = spec.DEFAULT_ALPHA
    # The engine's page size (the same RAAS_PAGE_SIZE the embedded engine reads); the
    # budget floor is two of its pages.
    page_size: int = Field(default=spec.DEFAULT_PAGE_SIZE, ge=1)
    # Unset: the engine's floor, two pages. A higher floor is a server policy; a lower one
    # is refused, as the engine would refuse every request under it.
    kv_min_budget_tokens: int = Field(default=spec.min_budget_tokens(), ge=1)
    kv_max_budget_tokens: int = Field(default=spec.MAX_BUDGET_TOKENS, ge=1)
    # Bytes one token's K and V take across all layers; None reads the model's config.json.
    kv_bytes_per_token: int | None = Field(default=None, ge=1)

    # --- logging ---
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    @field_validator("engine_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("kv_default_alpha")
    @classmethod
    def _alpha_range(cls, value: float) -> float:
        if problem := spec.alpha_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.kv_allowed_policies:
            raise ValueError("expected at least one allowed KV policy, got none")
        if self.kv_default_policy not in self.kv_allowed_policies:
            raise ValueError(
                f"expected kv_default_policy among {self.kv_allowed_policies}, "
                f"got {self.kv_default_policy!r}"
            )
        floor = spec.min_budget_tokens(self.page_size)
        if "kv_min_budget_tokens" not in self.model_fields_set:
            self.kv_min_budget_tokens = floor
        elif self.kv_min_budget_tokens < floor:
            raise ValueError(
                f"expected kv_min_budget_tokens >= {floor} ({spec.MIN_BUDGET_PAGES} pages of "
                f"{self.page_size}), got {self.kv_min_budget_tokens}"
            )
        if self.kv_min_budget_tokens > self.kv_max_budget_tokens:
            raise ValueError(
                f"expected kv_min_budget_tokens <= kv_max_budget_tokens, got "
                f"{self.kv_min_budget_tokens} > {self.kv_max_budget_tokens}"
            )
        if not (
            self.kv_min_budget_tokens <= self.kv_default_budget_tokens <= self.kv_max_budget_tokens
        ):
            raise ValueError(
                f"expected kv_default_budget_tokens in [{self.kv_min_budget_tokens}, "
                f"{self.kv_max_budget_tokens}], got {self.kv_default_budget_tokens}"
            )
        if "default_max_tokens" not in self.model_fields_set:
            # The stock default never exceeds a lower limit set alone.
            self.default_max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens_limit)
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("expected default_max_tokens <= max_tokens_limit")
        if self.engine_restart_backoff_s > self.engine_restart_backoff_max_s:
            raise ValueError("expected engine_restart_backoff_s <= engine_restart_backoff_max_s")
        return self

    @property
    def upstream_url(self) -> str:
        if self.engine_mode == "embedded":
            return f"http://{self.engine_host}:{self.engine_port}"
        return self.engine_url
