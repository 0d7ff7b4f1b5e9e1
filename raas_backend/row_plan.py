"""The host's half of a request whose policy state lives on the device.

When the batched device state (`kernels.row_policy_state.RowPolicyState`) decides
*which* pages a request keeps, the host still has to know *how many*: to size each
step's attention lists, plan the decode kernels, and hand the allocator a victim buffer
whose length it knows, all without reading the device. Those counts follow from
(prompt, decode length, budget, page size) alone (`retention.py`), so a `RowPlan` tracks
them step by step and reports the request's KV statistics from them.

A `RowPlan` offers the surface of `RequestKV` that the engine integration reads
(`begin_step`, `table`, `config`, `stats`, ...), with two differences: `begin_step`
returns how many pages the step evicts (the device picks them), and there are no scores
(they stay on the device).
"""

from __future__ import annotations

from raas_backend.policies import KVPolicyConfig
from raas_backend.policies.dense import DensePolicy
from raas_backend.policies.h2o import H2OPolicy
from raas_backend.policies.raas import RaaSPolicy
from raas_backend.policies.streaming import StreamingPolicy
from raas_backend.retention import retained_full_pages

#: The policies the device state serves (quest selects per layer from the query).
DEVICE_POLICIES = {p.name: p for p in (DensePolicy, RaaSPolicy, StreamingPolicy, H2OPolicy)}


class RowPlan:
    """Host-side counts of one request served by the device state.

    Attribute names follow `PageTable` (`table` is the plan itself), so code written
    against `RequestKV` reads either.
    """

    selects_per_layer = False

    def __init__(
        self,
        config: KVPolicyConfig,
        prompt_len: int,
        *,
        decode_len: int = 0,
        held_full_pages: int = 0,
        evicted_pages: int = 0,
        peak_retained_tokens: int = 0,
    ) -> None:
        if config.name not in DEVICE_POLICIES:
            raise ValueError(
                f"expected one of {sorted(DEVICE_POLICIES)} for the device state, "
                f"got {config.name!r}"
            )
        policy = DEVICE_POLICIES[config.name]
        self.config = config
        self.frees_memory = policy.frees_memory
        self.needs_scores = policy.needs_scores
        self.prompt_len = prompt_len
        self.page_size = config.page_size
        self.decode_len = decode_len
        self.held_full_pages = held_full_pages
        self.evicted_pages = evicted_pages
        self.peak_retained_tokens = max(peak_retained_tokens, self.retained_tokens)

    @property
    def table(self) -> RowPlan:
        return self

    # -- counts ------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.decode_len

    @property
    def num_pages(self) -> int:
        """Decode pages created so far (held or not)."""
        return -(-self.decode_len // self.page_size)

    @property
    def tail_tokens(self) -> int:
        return self.decode_len - self.page_size * (self.num_pages - 1) if self.decode_len else 0

    @property
    def retained_decode_tokens(self) -> int:
        if not self.frees_memory:
            return self.decode_len
        return self.tail_tokens + self.page_size * self.held_full_pages

    @property
    def retained_tokens(self) -> int:
        return self.prompt_len + self.retained_decode_tokens

    @property
    def held_pages(self) -> int:
        """Decode pages the device row lists (full ones and the tail)."""
        if not self.frees_memory:
            return self.num_pages
        return self.held_full_pages + (1 if self.decode_len else 0)

    @property
    def list_head(self) -> int:
        """Entries of the attention list before its first page: the prompt, or the whole
        row for a policy that holds everything (its list is the row as it stands)."""
        return self.prompt_len if self.frees_memory else self.seq_len

    @property
    def listed_tokens(self) -> int:
        return self.retained_tokens

    @property
    def scored_pages(self) -> int:
        """Pages whose attention mass the step reports for this request."""
        return self.held_pages if self.needs_scores else 0

    @property
    def evicted_tokens(self) -> int:
        return self.evicted_pages * self.page_size

    # -- the step ----------------------------------------------------------------------

    def begin_step(self) -> int:
        """Account the step's new token and evict down to the budget, as the device does.

        Returns how many pages the device evicts at this step (all full pages).
        """
        self.decode_len += 1
        victims = 0
        if self.frees_memory:
            # The old tail turned into a full page when this token opened a new one.
            opened = self.decode_len > 1 and (self.decode_len - 1) % self.page_size == 0
            after = retained_full_pages(self.decode_len, self.config.budget_tokens, self.page_size)
            victims = self.held_full_pages + int(opened) - after
            if victims < 0:
                raise RuntimeError(
                    f"raas: a step would grow {self.held_full_pages} held pages to {after}"
                )
            self.held_full_pages = after
            self.evicted_pages += victims
        self.peak_retained_tokens = max(self.peak_retained_tokens, self.retained_tokens)
        return victims

    def stats(self) -> dict[str, int | str | float]:
        return {
            "policy": self.config.name,
            "budget_tokens": self.config.budget_tokens,
            "alpha": self.config.alpha,
            "retained_tokens": self.retained_tokens,
            "peak_retained_tokens": self.peak_retained_tokens,
            "dense_equivalent_tokens": self.seq_len,
            "evicted_pages": self.evicted_pages,
        }
