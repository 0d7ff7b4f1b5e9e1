"""One request's KV policy state, driven step by step by an engine or the reference.

Shared by the SGLang backend and `reference.py`, so the oracle and the engine run the
same bookkeeping; what differs between them is the model implementation and the
attention plumbing.
"""

from __future__ import annotations

import torch

from raas_backend.policies import KVPolicy, KVPolicyConfig, make_policy


def head_aggregate(mass: torch.Tensor, head_agg: str) -> torch.Tensor:
    """Page scores over query heads: shape [pages, num_qo_heads] -> [pages]."""
    return mass.amax(dim=1) if head_agg == "max" else mass.mean(dim=1)


class RequestKV:
    """Policy + page table + the per-step score accumulator of one request."""

    def __init__(self, config: KVPolicyConfig, prompt_len: int) -> None:
        self.config = config
        self.policy: KVPolicy = make_policy(config, prompt_len)
        self.step = 0
        self._acc: torch.Tensor | None = None
        self._layers = 0
        self.pages: list[int] = []
        # Quest per KV group: this layer's pages of each KV head (`pages` is their union);
        # None when every head attends `pages` (other policies, or all groups agree).
        self.group_pages: list[list[int]] | None = None

    @classmethod
    def resumed(cls, prior: RequestKV, kv_len: int) -> RequestKV:
        """The state of a retracted request once SGLang has re-prefilled its history.

        The re-prefill recomputed every position, so the row holds all `kv_len` of them.
        The prompt stays the original one and the generated positions count as decode
        pages again, so the next `begin_step` evicts them down to the budget instead of
        keeping the whole history as a prompt. Page scores start afresh (the re-prefill
        did not score pages); evicted pages and the peak carry over.
        """
        prompt_len = prior.table.prompt_len
        if kv_len < prompt_len:
            raise ValueError(f"kv length {kv_len} is shorter than the prompt {prompt_len}")
        kv = cls(prior.config, prompt_len=prompt_len)
        for _ in range(kv_len - prompt_len):
            kv.step += 1
            kv.policy.on_token(kv.step)
        kv.table.evicted_pages = prior.table.evicted_pages
        kv.table.peak_retained_tokens = max(prior.table.peak_retained_tokens, kv_len)
        return kv

    @property
    def table(self):
        return self.policy.table

    @property
    def needs_scores(self) -> bool:
        return self.policy.needs_scores

    @property
    def selects_per_layer(self) -> bool:
        return self.config.name == "quest"

    def begin_step(self) -> list[int]:
        """Before a decode step: fold the last step's scores, add the new token, evict.

        Returns the positions whose slots must be freed now.
        """
        scores = self._finish_scores()
        self.policy.update(scores, self.step)
        self.step += 1
        self.policy.on_token(self.step)
        victims = self.policy.victims()
        freed = self.table.evict(victims) if victims else []
        self.table.record_peak()
        self.group_pages = None
        # Quest chooses its pages per layer, from that layer's query (select_for_layer).
        self.pages = (
            list(self.table.retained) if self.selects_per_layer else self.policy.attended_pages()
        )
        return freed

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, token_page) attended this step; token_page -1 for the prompt."""
        return self.table.retained_positions(self.pages), self.table.token_pages(self.pages)

    def add_layer_mass(self, mass: torch.Tensor) -> None:
        """Fold one layer's page mass (shape [len(pages), num_qo_heads]) into the step."""
        self.add_layer_scores(head_aggregate(mass, self.config.head_agg))

    def add_layer_scores(self, per_page: torch.Tensor) -> None:
        """Fold one layer's head-aggregated page scores (shape [len(pages)]) into the step."""
        self.add_step_scores(per_page, 1)

    def add_step_scores(self, per_page: torch.Tensor, layers: int) -> None:
        """Fold a whole step's scores at once: per_page (shape [len(pages)]) is already
        aggregated over heads and over `layers` layers (max, or the sum for a mean), as
        `layers` calls of `add_layer_scores` would have left it."""
        per_page = per_page.float().cpu()
        if self._acc is None:
            self._acc = per_page.clone()
        elif self.config.layer_agg == "max":
            torch.maximum(self._acc, per_page, out=self._acc)
        else:
            self._acc += per_page
        self._layers += layers

    def select_for_layer(self, bounds: torch.Tensor, num_kv_heads: int = 1) -> list[int]:
        """Quest: choose this layer's pages from bounds of shape [retained, num_qo_heads].

        With `quest_selection="kv_group"` and more than one KV head, each KV head picks its
        own pages from the bounds of its group's query heads (query head h belongs to KV
        head h // (num_qo_heads // num_kv_heads), as in GQA); `group_pages` then holds
        them and `kv_head_mask()` says which attended positions each KV head sees. With
        one KV head, or `quest_selection="layer"`, one set serves every head.
        Returns the pages attended by any head (`pages`).
        """
        agg = self.config.head_agg
        if self.config.quest_selection == "layer" or num_kv_heads == 1:
            per_page = bounds.amax(dim=1) if agg == "max" else bounds.mean(dim=1)
            # `positions()` serves this layer's attention from `self.pages`.
            self.pages = self.policy.attended_pages(per_page.float().cpu())
            self.group_pages = None
            return self.pages
        n, hq = bounds.shape
        if hq % num_kv_heads:
            raise ValueError(
                f"expected num_qo_heads divisible by num_kv_heads, got {hq}/{num_kv_heads}"
            )
        grouped = bounds.reshape(n, num_kv_heads, hq // num_kv_heads)
        per_group = grouped.amax(dim=2) if agg == "max" else grouped.mean(dim=2)
        groups = self.policy.attended_pages_per_group(per_group.float().cpu())
        self.pages = list(self.policy._last_attended)
        # Every head attending the same pages (e.g. before the budget binds) needs no mask.
        self.group_pages = None if all(g == self.pages for g in groups) else groups
        return self.pages

    def kv_head_mask(self) -> torch.Tensor | None:
        """Which KV heads see each position of `positions()`: shape [n, num_kv_heads],
        dtype torch.bool (the prompt is seen by all), or None when every head sees all."""
        if self.group_pages is None:
            return None
        index = {p: i for i, p in enumerate(self.pages)}
        on = torch.zeros(len(self.pages), len(self.group_pages), dtype=torch.bool)
        for g, pages in enumerate(self.group_pages):
            on[[index[p] for p in pages], g] = True
        counts = torch.tensor([self.table.page_tokens(p) for p in self.pages])
        prompt = torch.ones(self.table.prompt_len, len(self.group_pages), dtype=torch.bool)
        return torch.cat([prompt, on.repeat_interleave(counts, dim=0)])

    @property
    def attended_tokens(self) -> int:
        """KV tokens one head attends this step (per KV head for quest per group: the
        largest of its groups' counts)."""
        groups = self.group_pages if self.group_pages is not None else [self.pages]
        return self.table.prompt_len + max(
            sum(self.table.page_tokens(p) for p in g) for g in groups
        )

    def _finish_scores(self) -> torch.Tensor:
        n = len(self.policy._last_attended)
        if self._acc is None or not self.needs_scores:
            scores = torch.zeros(n)
        else:
            scores = self._acc if self.config.layer_agg == "max" else self._acc / self._layers
        self._acc = None
        self._layers = 0
        return scores

    def stats(self) -> dict[str, int | str | float]:
        return self.policy.stats()
