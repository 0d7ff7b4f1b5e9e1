"""Per-process RaaS state shared by the scheduler hooks and the attention backend.

SGLang builds the backend and calls the hooks itself, so the two meet here: one
`RaasRuntime` per scheduler process (TP=1), holding each running request's `RequestKV`
keyed by its `req_to_token` row. Nothing here imports SGLang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from raas_backend.policies import KVPolicyConfig, PolicyConfigError
from raas_backend.request_kv import RequestKV

logger = logging.getLogger(__name__)

CUSTOM_PARAMS_KEY = "kv_policy"
# Environment variables for the server defaults (SGLang's CLI has no room for ours).
ENV_DEFAULTS = {
    "RAAS_DEFAULT_POLICY": ("name", str),
    "RAAS_DEFAULT_BUDGET_TOKENS": ("budget_tokens", int),
    "RAAS_DEFAULT_ALPHA": ("alpha", float),
    "RAAS_DEFAULT_HEAD_AGG": ("head_agg", str),
    "RAAS_DEFAULT_LAYER_AGG": ("layer_agg", str),
    "RAAS_DEFAULT_REFRESH_TOP_FRACTION": ("refresh_top_fraction", float),
    "RAAS_DEFAULT_RECENT_TOKENS": ("recent_tokens", int),
    "RAAS_PAGE_SIZE": ("page_size", int),
}
# The largest budget a request may ask for (the CUDA path sizes its static score buffers
# by it); the gateway's own cap should not exceed it.
MAX_BUDGET_ENV = "RAAS_MAX_BUDGET_TOKENS"
DEFAULT_MAX_BUDGET_TOKENS = 8192


def max_budget_tokens(environ: dict[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    raw = environ.get(MAX_BUDGET_ENV, str(DEFAULT_MAX_BUDGET_TOKENS))
    try:
        value = int(raw)
    except ValueError as exc:
        raise PolicyConfigError("budget_tokens", f"{MAX_BUDGET_ENV}={raw!r} is not an int") from exc
    if value < 1:
        raise PolicyConfigError("budget_tokens", f"{MAX_BUDGET_ENV} must be >= 1, got {value}")
    return value


def defaults_from_env(environ: dict[str, str] | None = None) -> KVPolicyConfig:
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for var, (name, kind) in ENV_DEFAULTS.items():
        if var in environ:
            try:
                values[name] = kind(environ[var])
            except ValueError as exc:
                raise PolicyConfigError(
                    name, f"{var}={environ[var]!r} is not a {kind.__name__}"
                ) from exc
    # Checked where the defaults are read, so a request that sends no kv_policy (and
    # takes them whole) is bounded as one that overrides them.
    return within_budget_limit(KVPolicyConfig(**values), "RAAS_DEFAULT_BUDGET_TOKENS: ")


def parse_custom_params(custom_params: Any, defaults: KVPolicyConfig) -> KVPolicyConfig:
    """The effective policy of a request; raises PolicyConfigError on bad values."""
    if custom_params is None:
        return defaults
    if not isinstance(custom_params, dict):
        raise PolicyConfigError(
            "", f"custom_params must be an object, got {type(custom_params).__name__}"
        )
    return within_budget_limit(
        KVPolicyConfig.from_dict(custom_params.get(CUSTOM_PARAMS_KEY), defaults)
    )


def within_budget_limit(config: KVPolicyConfig, source: str = "") -> KVPolicyConfig:
    """`config` if its budget fits RAAS_MAX_BUDGET_TOKENS (dense has none to fit)."""
    limit = max_budget_tokens()
    if config.name != "dense" and config.budget_tokens > limit:
        raise PolicyConfigError(
            "budget_tokens",
            f"{source}expected at most {limit} (this server's {MAX_BUDGET_ENV}), "
            f"got {config.budget_tokens}",
        )
    return config


@dataclass
class Tracked:
    rid: str
    kv: RequestKV


@dataclass
class RaasRuntime:
    defaults: KVPolicyConfig
    requests: dict[int, Tracked] = field(default_factory=dict)
    #: Slots returned to the allocator by eviction since start (for tests and metrics).
    evicted_slots_total: int = 0
    #: Stats of finished requests, by rid, until the output path collects them.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: State of retracted requests, by rid, until their re-prefill decodes again.
    suspended: dict[str, RequestKV] = field(default_factory=dict)
    #: The current decode batch as the scheduler hook saw it on the host: rows and
    #: states in batch order (the CUDA backend builds its lists from it, no device read).
    decode_rows: list[int] = field(default_factory=list)
    decode_states: list[RequestKV] = field(default_factory=list)
    #: The last decode forward's page scores, folded in at the next step's bookkeeping.
    pending_scores: Any = None

    #: Whether the recorded batch is still to be planned (each is planned once).
    decode_pending: bool = False

    def set_step_batch(self, rows: list[int], states: list[RequestKV]) -> None:
        self.decode_rows, self.decode_states = rows, states
        self.decode_pending = True

    def step_batch(self) -> tuple[list[int], list[RequestKV]]:
        return self.decode_rows, self.decode_states

    def take_step_batch(self) -> tuple[list[int], list[RequestKV]] | None:
        """The batch the scheduler announced, once; None for a forward it did not
        announce (SGLang's warm-up and autotune dummy decodes)."""
        if not self.decode_pending:
            return None
        self.decode_pending = False
        return self.decode_rows, self.decode_states

    def fold_pending_scores(self) -> None:
        """Hand the last forward's scores to the requests still in their rows."""
        pending, self.pending_scores = self.pending_scores, None
        if pending is not None:
            live = {id(t.kv) for t in self.requests.values()}
            pending.fold(lambda state: id(state) in live)

    def effective_config(self, custom_params: Any, rid: str | None = None) -> KVPolicyConfig:
        """The request's policy; the defaults if its kv_policy is invalid (requests are
        validated at the HTTP edge: never let one crash the scheduler)."""
        try:
            return parse_custom_params(custom_params, self.defaults)
        except PolicyConfigError as exc:
            if rid is not None:
                logger.error(
                    "raas: request %s has an invalid kv_policy (%s); using defaults", rid, exc
                )
            return self.defaults

    def track(self, row: int, rid: str, custom_params: Any, kv_len: int) -> RequestKV:
        """The state of the request in `row`, created at its first decode step."""
        tracked = self.requests.get(row)
        if tracked is not None and tracked.rid == rid:
            return tracked.kv
        prior = self.suspended.pop(rid, None)
        if prior is not None and kv_len >= prior.table.prompt_len:
            # A retracted request, re-prefilled with its whole history: it stays bounded.
            kv = RequestKV.resumed(prior, kv_len)
            self.finished.pop(rid, None)
        else:
            kv = RequestKV(self.effective_config(custom_params, rid), prompt_len=kv_len)
        self.requests[row] = Tracked(rid, kv)
        return kv

    def get(self, row: int) -> RequestKV | None:
        tracked = self.requests.get(row)
        return tracked.kv if tracked else None

    def release(self, row: int, rid: str, *, retracted: bool = False) -> None:
        """The request left its row: finished, aborted, or (retracted) to be re-prefilled."""
        tracked = self.requests.get(row)
        if tracked is not None and tracked.rid == rid:
            del self.requests[row]
            self.finished[tracked.rid] = tracked.kv.stats()
            if retracted:
                self.suspended[rid] = tracked.kv
            # Bounded: the output path pops entries, a re-prefill takes its suspended
            # state back; never let stragglers (dropped requests) accumulate.
            for pending in (self.finished, self.suspended):
                while len(pending) > 4096:
                    pending.pop(next(iter(pending)))

    def take_finished(self, rid: str) -> dict[str, Any] | None:
        """The stats `release` stored for `rid`, removed (None if it never decoded)."""
        return self.finished.pop(rid, None)

    def prompt_only_stats(self, custom_params: Any, prompt_len: int) -> dict[str, Any]:
        """Stats of a request that finished before its first decode step (only its
        prompt was ever held), under its effective policy."""
        return RequestKV(self.effective_config(custom_params), prompt_len=prompt_len).stats()

    def evicted_positions(self, row: int) -> int:
        kv = self.get(row)
        return kv.table.evicted_tokens if kv else 0


_RUNTIME: RaasRuntime | None = None


def activate_runtime() -> RaasRuntime:
    """Called by the `raas` backend's constructor: from then on the hooks act."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = RaasRuntime(defaults=defaults_from_env())
    return _RUNTIME


def current_runtime() -> RaasRuntime | None:
    """The runtime if this process runs the `raas` backend, else None (hooks stay idle)."""
    return _RUNTIME
