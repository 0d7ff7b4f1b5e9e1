"""Budget-aware admission: turn RaaS's bounded KV into admitted concurrency and length.

SGLang sizes every request by its whole generation: at ingress it clips max_new_tokens
so that prompt + generation fits the KV pool (`Scheduler.init_req_max_new_tokens`), and
when it admits prefills it reserves room for each running and new request's remaining
max_new_tokens (`PrefillAdder`). Under a policy that frees memory (raas, streaming,
h2o) a request never holds more than its prompt plus `budget_tokens + page_size` decode
tokens, so both estimates are wrong by the ratio the product exists for:

- ingress: such a request keeps the max_new_tokens it asked for, bounded by the
  model's context length, not by the pool, when its prompt plus its bounded decode KV
  fits the pool (otherwise SGLang's own clip stands);
- admission: while the PrefillAdder does its arithmetic, each such request's
  max_new_tokens reads as what it can still grow: `output + min(remaining, cap - held)`,
  with `cap = budget_tokens + page_size` and `held` its retained decode tokens. SGLang's
  prefill server uses the same device (it sets max_new_tokens to 1 for its estimate).
  The real values are restored before any other code runs.

dense and quest keep every page, so their requests are sized exactly as SGLang does.
Nothing here imports SGLang; `register()` installs the hooks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from raas_backend.policies import POLICIES, KVPolicyConfig
from raas_backend.sglang_plugin.runtime import RaasRuntime, current_runtime

logger = logging.getLogger(__name__)


def decode_cap(config: KVPolicyConfig) -> int | None:
    """Most decode tokens a request under `config` ever holds; None if unbounded."""
    if not POLICIES[config.name].frees_memory:
        return None
    # Eviction runs before each decode allocation, so at most one page beyond the budget
    # (the tail being written) is held at any time.
    return config.budget_tokens + config.page_size


def growth_headroom(remaining_new_tokens: int, held_decode_tokens: int, cap: int | None) -> int:
    """Decode tokens a request may still add to what it holds (SGLang's reservation)."""
    remaining = max(remaining_new_tokens, 0)
    if cap is None:
        return remaining
    return max(0, min(remaining, cap - held_decode_tokens))


def _config_of(runtime: RaasRuntime, req: Any) -> KVPolicyConfig:
    return runtime.effective_config(req.sampling_params.custom_params)


def _held_decode_tokens(runtime: RaasRuntime, req: Any) -> int:
    row = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    tracked = runtime.requests.get(row) if row is not None else None
    if tracked is None or tracked.rid != req.rid:
        return 0  # not decoding yet: holds its prompt only
    return tracked.kv.table.retained_decode_tokens


@contextmanager
def bounded_generation_view(reqs: Iterable[Any]) -> Iterator[None]:
    """Within the block, max_new_tokens of each request under a freeing policy reads as
    its output so far plus the decode KV it can still add."""
    runtime = current_runtime()
    saved: list[tuple[Any, int]] = []
    try:
        if runtime is not None:
            for req in reqs:
                params = req.sampling_params
                if params.max_new_tokens is None:
                    continue
                cap = decode_cap(_config_of(runtime, req))
                if cap is None:
                    continue
                produced = len(req.output_ids)
                view = produced + growth_headroom(
                    params.max_new_tokens - produced, _held_decode_tokens(runtime, req), cap
                )
                if view < params.max_new_tokens:
                    saved.append((params, params.max_new_tokens))
                    params.max_new_tokens = view
        yield
    finally:
        # Reverse order: a request listed twice is restored to its first saved value.
        for params, value in reversed(saved):
            params.max_new_tokens = value


def _running_reqs(adder: Any) -> list[Any]:
    batch = getattr(adder, "running_batch", None)
    return list(batch.reqs) if batch is not None else []


def around_adder_init(original, adder: Any, *args: Any, **kwargs: Any) -> None:
    # The running batch is an argument here (it becomes adder.running_batch inside).
    batch = kwargs.get("running_batch", args[3] if len(args) > 3 else None)
    reqs = list(batch.reqs) if batch is not None else []
    with bounded_generation_view(reqs):
        return original(adder, *args, **kwargs)


def around_adder_add(original, adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    reqs = [req, *_running_reqs(adder), *getattr(adder, "can_run_list", [])]
    with bounded_generation_view(reqs):
        return original(adder, req, *args, **kwargs)


def _context_bound(scheduler: Any, input_len: int, requested: int) -> int:
    bound = min(requested, scheduler.model_config.context_len - 1 - input_len)
    limit = getattr(scheduler, "max_new_tokens_limit", None)
    if limit is not None and limit > 0:
        bound = min(bound, limit)
    return max(0, bound)


def around_init_req_max_new_tokens(original, scheduler: Any, req: Any) -> Any:
    requested = req.sampling_params.max_new_tokens
    result = original(scheduler, req)
    runtime = current_runtime()
    if runtime is None or requested is None or req.finished():
        return result
    config = _config_of(runtime, req)
    cap = decode_cap(config)
    if cap is None:
        return result
    input_len = len(req.origin_input_ids)
    page = scheduler.page_size
    paged_input = -(-input_len // page) * page
    # Prompt + bounded decode KV + the allocator's rounding page must fit the pool.
    if paged_input + cap + 2 * page > scheduler.max_total_num_tokens:
        return result
    bound = _context_bound(scheduler, input_len, requested)
    if bound > req.sampling_params.max_new_tokens:
        logger.debug(
            "raas: request %s keeps max_new_tokens %d (pool clip was %d; decode KV <= %d)",
            req.rid,
            bound,
            req.sampling_params.max_new_tokens,
            cap,
        )
        req.sampling_params.max_new_tokens = bound
    return result


def admission_enabled(environ: dict[str, str] | None = None) -> bool:
    """RAAS_BUDGET_AWARE_ADMISSION=0 restores SGLang's own sizing (for comparisons)."""
    env = os.environ if environ is None else environ
    return env.get("RAAS_BUDGET_AWARE_ADMISSION", "1").strip().lower() not in ("0", "false", "no")
