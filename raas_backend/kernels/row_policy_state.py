"""Every running request's KV policy state on the device, one row per engine row.

The per-request policies (`raas_backend.policies`, driven by `RequestKV`) are the
specification. This module does what they do for a whole decode batch with tensor
operations only: no Python loop over requests, no read back to the host, every size
taken from numbers the host already knows (`raas_backend.row_plan.RowPlan`). It serves
raas (with the adaptive refresh), streaming, h2o and dense requests mixed in one batch;
quest selects pages per layer from the query and stays on the per-request path.

The state is indexed by the engine's `req_to_token` row, so a request keeps its row
while the batch around it changes. Per row:

- ``pages``: shape [R, cap], dtype torch.int32. Held decode pages (logical ids,
  ascending, the tail last), padded with -1. Dense rows list none (they hold the row).
- ``last_used``: shape [R, cap], dtype torch.int64: raas, the step each page was last
  used (its creation step until then).
- ``cum_mass``: shape [R, cap], dtype torch.float64: h2o, each page's summed mass
  (float64, as the per-request policy's Python floats).
- ``num_pages``, ``prompt``, ``seq``, ``steps``: shape [R], dtype torch.int64.
- the configuration: ``policy`` (`POLICY_CODES`), ``budget``, ``recent``, ``agg``
  (the score accumulator row, `AGG_ROWS`), ``alpha`` (float32, compared as the
  policy compares a float32 score), ``refresh`` (float64).
- ``errors``: shape [1], dtype torch.int64, a bit set of `ERROR_BITS`, raised on the
  host by `check` (a read the caller makes where a synchronisation is free or wanted).

One decode step: `fold_scores` (the last forward's page scores), `step` (open pages,
pick victims, hand back their slots, compact), `build_lists` (the step's attention
lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raas_backend.policies import KVPolicyConfig

POLICY_CODES = {"dense": 0, "streaming": 1, "raas": 2, "h2o": 3}
DENSE, STREAMING, RAAS, H2O = (POLICY_CODES[n] for n in ("dense", "streaming", "raas", "h2o"))
# Rows of the step's score accumulator, by (head_agg, layer_agg); odd rows are
# layer sums (divided by the layer count when folded).
AGG_ROWS: dict[tuple[str, str], int] = {
    ("max", "max"): 0,
    ("max", "mean"): 1,
    ("mean", "max"): 2,
    ("mean", "mean"): 3,
}
ERROR_BITS = {
    1: "a victim's slot was already freed (padding slot)",
    2: "the victims differ from the host's count",
    4: "a row's held pages differ from the host's count",
    8: "a row ran out of page capacity",
}


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


class RowPolicyState:
    """Policy state of up to `rows` requests; see the module docstring."""

    def __init__(
        self, rows: int, capacity: int, page_size: int, device: torch.device | str
    ) -> None:
        if page_size < 1 or capacity < 2:
            raise ValueError(
                f"expected page_size >= 1 and capacity >= 2, got {page_size}, {capacity}"
            )
        self.rows, self.capacity, self.page_size = rows, capacity, page_size
        self.device = torch.device(device)
        i64 = {"dtype": torch.int64, "device": self.device}
        self.pages = torch.full((rows, capacity), -1, dtype=torch.int32, device=self.device)
        self.last_used = torch.zeros((rows, capacity), **i64)
        self.cum_mass = torch.zeros((rows, capacity), dtype=torch.float64, device=self.device)
        self.num_pages = torch.zeros(rows, **i64)
        self.prompt = torch.zeros(rows, **i64)
        self.seq = torch.zeros(rows, **i64)
        self.steps = torch.zeros(rows, **i64)
        self.policy = torch.zeros(rows, **i64)
        self.budget = torch.zeros(rows, **i64)
        self.recent = torch.zeros(rows, **i64)
        self.agg = torch.zeros(rows, **i64)
        self.alpha = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.refresh = torch.zeros(rows, dtype=torch.float64, device=self.device)
        self.errors = torch.zeros(1, **i64)
        self._col = torch.arange(capacity, **i64)

    # -- host -> device ----------------------------------------------------------------

    def _rows(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.int64).to(self.device, non_blocking=True)

    def _put(self, target: torch.Tensor, rows_t: torch.Tensor, values: list, dtype) -> None:
        target[rows_t] = torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def start(
        self,
        rows: Sequence[int],
        configs: Sequence[KVPolicyConfig],
        prompt_lens: Sequence[int],
        *,
        decode_lens: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        pages: Sequence[Sequence[int]] | None = None,
        last_used: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Give requests their rows: fresh after prefill (no decode pages), or, with
        the keyword arguments, resumed with the pages a host replay kept."""
        if not rows:
            return
        n = len(rows)
        for cfg in configs:
            if cfg.name not in POLICY_CODES or cfg.page_size != self.page_size:
                raise ValueError(
                    f"expected a policy in {sorted(POLICY_CODES)} with page size "
                    f"{self.page_size}, got {cfg.name!r} with {cfg.page_size}"
                )
        decode_lens = list(decode_lens) if decode_lens is not None else [0] * n
        steps = list(steps) if steps is not None else [0] * n
        page_lists = [list(p) for p in pages] if pages is not None else [[] for _ in rows]
        used_lists = [list(u) for u in last_used] if last_used is not None else [[] for _ in rows]
        if any(len(p) > self.capacity for p in page_lists):
            raise ValueError(f"expected at most {self.capacity} pages per row")
        r = self._rows(rows)
        self._put(self.policy, r, [POLICY_CODES[c.name] for c in configs], torch.int64)
        self._put(self.budget, r, [c.budget_tokens for c in configs], torch.int64)
        self._put(self.recent, r, [c.recent_tokens for c in configs], torch.int64)
        self._put(self.agg, r, [AGG_ROWS[(c.head_agg, c.layer_agg)] for c in configs], torch.int64)
        self._put(self.alpha, r, [c.alpha for c in configs], torch.float32)
        self._put(self.refresh, r, [c.refresh_top_fraction for c in configs], torch.float64)
        self._put(self.prompt, r, list(prompt_lens), torch.int64)
        self._put(
            self.seq, r, [p + d for p, d in zip(prompt_lens, decode_lens, strict=True)], torch.int64
        )
        self._put(self.steps, r, steps, torch.int64)
        self._put(self.num_pages, r, [len(p) for p in page_lists], torch.int64)
        table = torch.full((n, self.capacity), -1, dtype=torch.int32)
        used = torch.zeros((n, self.capacity), dtype=torch.int64)
        for i, (p, u) in enumerate(zip(page_lists, used_lists, strict=True)):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
            if u:
                used[i, : len(u)] = torch.tensor(u, dtype=torch.int64)
        self.pages[r] = table.to(self.device, non_blocking=True)
        self.last_used[r] = used.to(self.device, non_blocking=True)
        self.cum_mass[r] = 0.0

    # -- one step ----------------------------------------------------------------------

    def fold_scores(
        self,
        rows: Sequence[int],
        page_starts: Sequence[int],
        counts: Sequence[int],
        acc: torch.Tensor,
        layers: int,
    ) -> None:
        """Fold the last forward's page scores into the rows that are still running.

        rows: the rows to fold (those of the forward whose request still holds them).
        page_starts, counts: each row's first scored page in the forward's layout and
            how many it listed (its held pages then: the state has not moved since).
        acc: shape [4, >= sum(counts)], float32, the step's accumulators (`AGG_ROWS`).
        layers: the forward's attention layers (the divisor of layer means).
        """
        if not rows or not any(counts):
            return
        r = self._rows(rows)
        start = torch.tensor(list(page_starts), dtype=torch.int64).to(
            self.device, non_blocking=True
        )
        count = torch.tensor(list(counts), dtype=torch.int64).to(self.device, non_blocking=True)
        valid = self._col[None, :] < count[:, None]
        idx = (start[:, None] + self._col[None, :]).clamp(max=acc.shape[1] - 1)
        agg = self.agg[r]
        scores = acc[agg[:, None], idx]
        # Same float32 arithmetic as `RequestKV._finish_scores`.
        scores = torch.where((agg % 2 == 1)[:, None], scores / layers, scores)
        policy = self.policy[r]
        raas = valid & (policy == RAAS)[:, None]
        used = raas & (scores > self.alpha[r][:, None])
        refresh = self.refresh[r]
        # `policies.raas.used_pages`: the top ceil(f * n) (at least one) by score, if
        # attended at all; ties go to the older page.
        k = torch.clamp(torch.ceil(count.double() * refresh - 1e-9).long(), min=1)
        ranked = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        order = torch.argsort(ranked, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, self._col.expand_as(order))
        used |= raas & (refresh > 0)[:, None] & (rank < k[:, None]) & (scores > 0)
        self.last_used[r] = torch.where(used, self.steps[r][:, None], self.last_used[r])
        h2o = valid & (policy == H2O)[:, None]
        self.cum_mass[r] = self.cum_mass[r] + torch.where(
            h2o, scores.double(), torch.zeros_like(scores, dtype=torch.float64)
        )

    def step(
        self,
        rows: Sequence[int],
        victims: Sequence[int],
        held_pages: Sequence[int],
        req_to_token: torch.Tensor,
    ) -> torch.Tensor:
        """Account each row's new token, evict down to its budget, free the victims.

        victims, held_pages: the host's counts (`RowPlan.begin_step`, `held_pages`):
            the step evicts ``victims[i]`` pages of ``rows[i]`` and leaves it holding
            ``held_pages[i]``; the device checks both (`errors`).
        req_to_token: the engine's position -> slot table; each victim's positions are
            set to the padding slot 0.
        Returns shape [sum(victims) * page_size], dtype torch.int64: the victims' slots,
        row by row, to hand back to the allocator.
        """
        p = self.page_size
        total = sum(victims)
        if not rows:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        r = self._rows(rows)
        col = self._col
        policy = self.policy[r]
        frees = policy != DENSE
        prompt = self.prompt[r]
        steps = self.steps[r] + 1
        num = self.num_pages[r]
        dl = self.seq[r] - prompt
        opens = frees & (dl % p == 0)
        at = opens[:, None] & (col[None, :] == num[:, None])
        pages = torch.where(
            at, torch.div(dl, p, rounding_mode="floor").to(torch.int32)[:, None], self.pages[r]
        )
        last = torch.where(at, steps[:, None], self.last_used[r])
        mass = torch.where(at, torch.zeros_like(self.cum_mass[r]), self.cum_mass[r])
        overflow = opens & (num >= self.capacity)
        num = num + opens.long()
        dl = dl + 1
        self.seq[r] = prompt + dl
        self.steps[r] = steps
        err = overflow.any().long() * 8
        maxv = max(victims)
        if maxv > 0:
            listed = col[None, :] < num[:, None]
            tok = (dl[:, None] - pages.long() * p).clamp(0, p)
            tok = torch.where(listed, tok, torch.zeros_like(tok))
            excess = (tok.sum(dim=1) - self.budget[r]).clamp(min=0)
            n_evict = torch.where(frees, _ceil_div(excess, p), torch.zeros_like(excess))
            tail = torch.div(dl - 1, p, rounding_mode="floor")
            cand = listed & frees[:, None] & (pages.long() != tail[:, None])
            h2o = policy == H2O
            protected = (pages.long() + 1) * p > (dl - self.recent[r])[:, None]
            cand &= ~(h2o[:, None] & protected)
            # First to go first: raas the oldest last_used, h2o the least mass,
            # streaming the oldest page; a stable sort breaks ties by the older page.
            key = torch.where(
                (policy == RAAS)[:, None],
                last.double(),
                torch.where(h2o[:, None], mass, torch.zeros_like(mass)),
            )
            key = torch.where(cand, key, torch.full_like(key, float("inf")))
            order = torch.argsort(key, dim=1, stable=True)[:, :maxv]
            j = torch.arange(maxv, dtype=torch.int64, device=self.device)
            is_v = (j[None, :] < n_evict[:, None]) & torch.gather(cand, 1, order)
            want = torch.tensor(list(victims), dtype=torch.int64).to(self.device, non_blocking=True)
            err = err | ((is_v.sum(dim=1) != want) | (n_evict != want)).any().long() * 2
            vpage = torch.gather(pages, 1, order).long()
            offs = torch.arange(p, dtype=torch.int64, device=self.device)
            pos = prompt[:, None, None] + vpage[:, :, None] * p + offs[None, None, :]
            pos = pos.clamp(0, req_to_token.shape[1] - 1)
            row_idx = r[:, None, None].expand_as(pos)
            slots = req_to_token[row_idx, pos].long()
            is_vt = is_v[:, :, None].expand_as(pos)
            err = err | (is_vt & (slots == 0)).any().long()
            starts = torch.zeros(len(rows), dtype=torch.int64)
            torch.cumsum(torch.tensor(list(victims[:-1]), dtype=torch.int64), 0, out=starts[1:])
            first = starts.to(self.device, non_blocking=True)
            dest = (first[:, None, None] + j[None, :, None]) * p + offs[None, None, :]
            dest = torch.where(is_vt, dest, torch.full_like(dest, total * p))
            out = torch.zeros(total * p + 1, dtype=torch.int64, device=self.device)
            out.index_put_((dest.reshape(-1),), slots.reshape(-1))
            # Victims' entries become the padding slot; the rest are written back as read.
            req_to_token.index_put_(
                (row_idx.reshape(-1), pos.reshape(-1)),
                torch.where(is_vt, torch.zeros_like(slots), slots)
                .to(req_to_token.dtype)
                .reshape(-1),
            )
            gone = torch.zeros_like(listed)
            gone.scatter_(1, order, is_v)
            keep = listed & ~gone
            squeeze = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            num = keep.sum(dim=1)
            live = col[None, :] < num[:, None]
            pages = torch.where(live, torch.gather(pages, 1, squeeze), torch.full_like(pages, -1))
            last = torch.where(live, torch.gather(last, 1, squeeze), torch.zeros_like(last))
            mass = torch.where(live, torch.gather(mass, 1, squeeze), torch.zeros_like(mass))
            freed = out[: total * p]
        else:
            freed = torch.zeros(0, dtype=torch.int64, device=self.device)
        held = torch.tensor(list(held_pages), dtype=torch.int64).to(self.device, non_blocking=True)
        err = err | (torch.where(frees, num, held) != held).any().long() * 4
        self.pages[r], self.last_used[r], self.cum_mass[r], self.num_pages[r] = (
            pages,
            last,
            mass,
            num,
        )
        self.errors |= err
        return freed

    # -- the step's attention lists ----------------------------------------------------

    def build_lists(
        self,
        rows: Sequence[int],
        heads: Sequence[int],
        lengths: Sequence[int],
        page_starts: Sequence[int],
        req_to_token: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        with_pages: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each request's attention list as engine slots, in one pass on the device.

        Row i lists ``lengths[i]`` entries: positions ``0 .. heads[i] - 1`` (its prompt,
        or the whole row for a row without pages: dense, quest, untracked), then its
        held pages in order. page_starts[i]: the global id of its first scored page,
        or -1 when the step reports no scores for it.
        out: optional shape [>= sum(lengths)], dtype torch.int32 (a CUDA-graph wrapper's
            static indices buffer), filled in its prefix.
        Returns (slots [sum(lengths)] int32, each entry's scored page id [sum] int64 or
        -1, when with_pages, else None).
        """
        total = sum(lengths)
        dev = req_to_token.device
        b = len(rows)
        lens_t = torch.tensor(list(lengths), dtype=torch.int64)
        indptr = torch.zeros(b + 1, dtype=torch.int64)
        torch.cumsum(lens_t, 0, out=indptr[1:])
        r = self._rows(rows).to(dev)
        heads_t = torch.tensor(list(heads), dtype=torch.int64).to(dev, non_blocking=True)
        first = indptr[:-1].to(dev, non_blocking=True)
        row_of = torch.repeat_interleave(
            torch.arange(b, device=dev), lens_t.to(dev, non_blocking=True), output_size=total
        )
        o = torch.arange(total, dtype=torch.int64, device=dev) - first[row_of]
        rr = r[row_of]
        h = heads_t[row_of]
        in_head = o < h
        k = torch.div(o - h, self.page_size, rounding_mode="floor").clamp(0, self.capacity - 1)
        page = self.pages[rr, k].long()
        pos = torch.where(
            in_head, o, self.prompt[rr] + page * self.page_size + (o - h) % self.page_size
        )
        slots = req_to_token[rr, pos]
        if out is None:
            out = torch.empty(total, dtype=torch.int32, device=dev)
        if out.numel() < total:
            raise ValueError(f"expected an indices buffer of >= {total} entries, got {out.numel()}")
        out[:total].copy_(slots)
        token_page = None
        if with_pages:
            pstart = torch.tensor(list(page_starts), dtype=torch.int64).to(dev, non_blocking=True)
            ps = pstart[row_of]
            token_page = torch.where(in_head | (ps < 0), torch.full_like(k, -1), ps + k)
        return out[:total], token_page

    # -- checks ------------------------------------------------------------------------

    def check(self) -> None:
        """Raise if any step went wrong since the last check (reads the device)."""
        bits = int(self.errors.item())
        if bits:
            self.errors.zero_()
            why = "; ".join(msg for bit, msg in ERROR_BITS.items() if bits & bit)
            raise RuntimeError(f"raas: the device policy state is inconsistent: {why}")

    def held(self, row: int) -> list[int]:
        """The pages a row holds (a host read: for tests and debugging)."""
        n = int(self.num_pages[row])
        return self.pages[row, :n].tolist()
