"""Per-process RaaS state shared by the scheduler hooks and the attention backend.

SGLang builds the backend and calls the hooks itself, so the two meet here: one
`RaasRuntime` per scheduler process (TP=1), holding each running request's `RequestKV`
keyed by its `req_to_token` row. Nothing here imports SGLang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raas_backend.policies import KVPolicyConfig, PolicyConfigError
from raas_backend.request_kv import RequestKV
from raas_backend.row_plan import DEVICE_POLICIES, RowPlan

if TYPE_CHECKING:
    import torch

    from raas_backend.kernels.row_policy_state import RowPolicyState

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
# Where the policies of raas/streaming/h2o/dense requests run: "device" (the batched
# state, `kernels.row_policy_state`; no read back in decode) or "host" (one `RequestKV`
# per request, the specification; the page scores are read back once per step).
POLICY_STATE_ENV = "RAAS_POLICY_STATE"
POLICY_STATE_MODES = ("device", "host")


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


def policy_state_mode(environ: dict[str, str] | None = None) -> str:
    """The mode RAAS_POLICY_STATE names: "device" by default, on a GPU and on the CPU
    alike (so the CPU engine runs the bookkeeping the GPU runs)."""
    environ = os.environ if environ is None else environ
    mode = environ.get(POLICY_STATE_ENV, "device")
    if mode not in POLICY_STATE_MODES:
        raise ValueError(f"{POLICY_STATE_ENV} must be one of {POLICY_STATE_MODES}, got {mode!r}")
    return mode


def pages_cap(page_size: int) -> int:
    """Pages one request can list in a step: its budget's pages, the page being filled
    and the tail (see `kernels.batched_policy.min_capacity`)."""
    return -(-max_budget_tokens() // page_size) + 2


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


KVState = RequestKV | RowPlan


@dataclass
class Tracked:
    rid: str
    kv: KVState


@dataclass
class DecodeStep:
    """What one decode step's bookkeeping decided, for the hook to carry out.

    host_rows, host_positions: positions the host's per-request states evict (quest
    never does; host-mode requests and resumed ones do), row by row.
    device_slots: the slots the device state evicted (already replaced by the padding
    slot in `req_to_token`), of a length the host knows; None if no request is there.
    """

    rows: list[int]
    states: list[KVState]
    host_rows: list[int]
    host_positions: list[int]
    device_slots: torch.Tensor | None
    device_victim_pages: int


@dataclass
class RaasRuntime:
    defaults: KVPolicyConfig
    requests: dict[int, Tracked] = field(default_factory=dict)
    #: The batched device state (set by the backend in "device" mode; None: host mode).
    device_state: RowPolicyState | None = None
    #: Decode steps since start (the device state's flags are read every so often).
    steps_done: int = 0
    #: Slots returned to the allocator by eviction since start (for tests and metrics).
    evicted_slots_total: int = 0
    #: Stats of finished requests, by rid, until the output path collects them.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: State of retracted requests, by rid, until their re-prefill decodes again.
    suspended: dict[str, KVState] = field(default_factory=dict)
    #: The current decode batch as the scheduler hook saw it on the host: rows and
    #: states in batch order (the CUDA backend builds its lists from it, no device read).
    decode_rows: list[int] = field(default_factory=list)
    decode_states: list[KVState] = field(default_factory=list)
    #: The last decode forward's page scores, folded in at the next step's bookkeeping.
    pending_scores: Any = None

    #: Whether the recorded batch is still to be planned (each is planned once).
    decode_pending: bool = False

    def attach_device_state(self, rows: int, device: torch.device | str) -> None:
        """Give the batched device state its tables (the backend's constructor calls
        this with the engine's row count and device), unless RAAS_POLICY_STATE=host."""
        if self.device_state is not None or policy_state_mode() != "device":
            return
        from raas_backend.kernels.row_policy_state import RowPolicyState

        size = self.defaults.page_size
        self.device_state = RowPolicyState(rows, pages_cap(size), size, device)

    def set_step_batch(self, rows: list[int], states: list[KVState]) -> None:
        self.decode_rows, self.decode_states = rows, states
        self.decode_pending = True

    def step_batch(self) -> tuple[list[int], list[KVState]]:
        return self.decode_rows, self.decode_states

    def take_step_batch(self) -> tuple[list[int], list[KVState]] | None:
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
            pending.fold(lambda state: id(state) in live, self.device_state)

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

    def track(self, row: int, rid: str, custom_params: Any, kv_len: int) -> KVState:
        """The state of the request in `row`, created at its first decode step: a
        `RowPlan` where the device state serves the policy, else a `RequestKV`; a
        retracted request's state is resumed from what it held (a `RequestKV` replayed
        on the host, which `begin_decode_step` hands to the device state)."""
        tracked = self.requests.get(row)
        if tracked is not None and tracked.rid == rid:
            return tracked.kv
        prior = self.suspended.pop(rid, None)
        kv: KVState
        if prior is not None and kv_len >= prior.table.prompt_len:
            # A retracted request, re-prefilled with its whole history: its generated
            # part counts as decode pages again, evicted back to the budget.
            kv = RequestKV.resumed(prior, kv_len)
            self.finished.pop(rid, None)
        else:
            config = self.effective_config(custom_params, rid)
            if self.device_state is not None and config.name in DEVICE_POLICIES:
                kv = RowPlan(config, prompt_len=kv_len)
            else:
                kv = RequestKV(config, prompt_len=kv_len)
        self.requests[row] = Tracked(rid, kv)
        return kv

    def begin_decode_step(
        self, entries: list[tuple[int, str, Any, int]], req_to_token: torch.Tensor
    ) -> DecodeStep:
        """The bookkeeping of one decode step, before its allocation.

        entries: (row, rid, custom_params, kv length) of each request in batch order.
        Folds the last forward's scores, starts the state of requests at their first
        decode step, accounts each request's new token and evicts down to the budgets:
        on the device for the requests the device state serves (victim counts from the
        host's `RowPlan`s, nothing read back), per request on the host for the rest.
        """
        self.fold_pending_scores()
        device = self.device_state
        step = DecodeStep([], [], [], [], None, 0)
        fresh: list[tuple[int, KVPolicyConfig, int]] = []
        dev_rows: list[int] = []
        dev_victims: list[int] = []
        dev_held: list[int] = []
        for row, rid, custom_params, kv_len in entries:
            state = self.track(row, rid, custom_params, kv_len)
            stepped = False
            if isinstance(state, RowPlan) and state.decode_len == 0:
                fresh.append((row, state.config, kv_len))
            elif (
                device is not None
                and isinstance(state, RequestKV)
                and state.config.name in DEVICE_POLICIES
            ):
                # A resumed request, replayed on the host once (nothing scored it since
                # the re-prefill), stepped there and handed to the device as it stands.
                freed = state.begin_step()
                step.host_rows.extend([row] * len(freed))
                step.host_positions.extend(freed)
                state = self._resume_on_device(row, state)
                self.requests[row] = Tracked(rid, state)
                stepped = True
            if not stepped:
                if isinstance(state, RowPlan):
                    dev_rows.append(row)
                    dev_victims.append(state.begin_step())
                    dev_held.append(state.held_pages)
                else:
                    freed = state.begin_step()
                    step.host_rows.extend([row] * len(freed))
                    step.host_positions.extend(freed)
            if state.table.seq_len != kv_len + 1:
                raise RuntimeError(
                    f"raas: request {rid} expected kv length {state.table.seq_len - 1}, "
                    f"engine has {kv_len}"
                )
            step.rows.append(row)
            step.states.append(state)
        if device is not None:
            if fresh:
                rows, configs, prompts = zip(*fresh, strict=True)
                device.start(rows, configs, prompts)
            if dev_rows:
                step.device_slots = device.step(dev_rows, dev_victims, dev_held, req_to_token)
                step.device_victim_pages = sum(dev_victims)
            self.steps_done += 1
            if device.device.type == "cpu" or self.steps_done % check_every_steps() == 0:
                device.check()
        self.set_step_batch(step.rows, step.states)
        return step

    def _resume_on_device(self, row: int, kv: RequestKV) -> RowPlan:
        """Move a host-replayed resumed request's state into its device row."""
        assert self.device_state is not None
        table = kv.table
        held = list(table.retained)
        policy = kv.policy
        used = [policy.last_used[p] for p in held] if hasattr(policy, "last_used") else None
        self.device_state.start(
            [row],
            [kv.config],
            [table.prompt_len],
            decode_lens=[table.decode_len],
            steps=[kv.step],
            pages=[held],
            last_used=[used] if used is not None else None,
        )
        return RowPlan(
            kv.config,
            table.prompt_len,
            decode_len=table.decode_len,
            held_full_pages=len(held) - (1 if table.decode_len else 0),
            evicted_pages=table.evicted_pages,
            peak_retained_tokens=table.peak_retained_tokens,
        )

    def get(self, row: int) -> KVState | None:
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


# How often a GPU's device state is checked (a read back); every step on the CPU and
# under SGLang's own page-invariant checks.
CHECK_EVERY_STEPS = 256


def check_every_steps() -> int:
    strict = os.environ.get("SGLANG_CHECK_KV_PAGE_INVARIANTS", "").lower() in ("1", "true")
    return 1 if strict else CHECK_EVERY_STEPS


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
