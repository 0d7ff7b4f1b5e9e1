"""Many KV policy configurations over one sequence, as one batch: the study's engine.

`raas_backend.reference.PolicyRunner` runs one configuration per pass; the fidelity
grid is hundreds of (configuration, sequence) pairs, which one at a time does not fit a
2-core CPU. Here batch row b runs configuration b: every row is fed the same tokens
(teacher forcing) or its own greedy tokens (free running), keeps its own full KV cache,
and at each decode step attends only to the positions its policy retains, through a
per-row, per-KV-head mask over that cache (quest's per-KV-group selection gives each KV
head its own pages; every other policy sets all heads alike). Bookkeeping is the same
`RequestKV` the reference and the engine use; the masked softmax over the full cache
equals the reference's softmax over the gathered positions. tests/test_fidelity_smoke.py
checks the two agree row by row.

Page scores are computed for every row under all four aggregations (max/mean over heads
x max/mean over layers) at once; each row's policy receives its own aggregation, and
`record_row` keeps all four for one row (the study's milestone analysis of dense
attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV

ATTN_NAME = "raas_batched_eval"
# Order of the aggregations in `BatchResult.recorded_scores[step]`: (head, layer).
AGGREGATIONS = (("max", "max"), ("max", "mean"), ("mean", "max"), ("mean", "mean"))

# Called at each position i with the logits of every row, shape [B, vocab] float32.
Observer = Callable[[int, torch.Tensor], None]
# Picks every row's next token from its logits [B, vocab] (default: argmax).
Chooser = Callable[[torch.Tensor], list[int]]


@dataclass
class BatchResult:
    tokens: list[list[int]]  # per row, the token fed (or chosen) at each position
    retained_tokens: list[list[int]]  # per row and decode step: KV tokens held
    attended_tokens: list[list[int]]  # per row and decode step: KV tokens attended
    stats: list[dict[str, int | str | float]]
    # Per decode step, shape [4, pages so far]: record_row's page scores under each
    # aggregation of AGGREGATIONS, from that step's query (empty without record_row).
    recorded_scores: list[torch.Tensor] = field(default_factory=list)
    # (decode step, every row's retained decode pages after eviction), every
    # `snapshot_every` steps.
    snapshots: list[tuple[int, list[list[int]]]] = field(default_factory=list)


class _Run:
    """What the attention function needs during one batched run.

    Rows live in buffer slots; only the first `active` slots go through the model. A row
    whose policy has not yet dropped anything from its attention computes exactly what
    the dense row 0 computes, so it waits outside the batch and borrows row 0's logits
    and page scores; at its first eviction (quest: its first real selection) it takes
    the next slot, with a copy of row 0's cache.
    """

    def __init__(
        self, capacity: int, prompt_len: int, max_len: int, page_size: int, num_kv_heads: int
    ) -> None:
        self.states: list[RequestKV] = []  # by slot
        self.prompt_len = prompt_len
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.max_pages = -(-(max_len - prompt_len) // page_size)
        width = prompt_len + self.max_pages * page_size
        # [slot, KV head, position]: what each KV head of each row attends.
        self.mask = torch.zeros(capacity, num_kv_heads, width, dtype=torch.bool)
        self.mask[:, :, :prompt_len] = True
        self.capacity = capacity
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.position = -1  # the decode position being computed; -1 during prefill
        self.quest_rows: list[int] = []
        self.acc: torch.Tensor | None = None  # [4, active, pages]: AGGREGATIONS order
        self.layers = 0

    @property
    def active(self) -> int:
        return len(self.states)

    def activate(self, state: RequestKV) -> int:
        """Give a row the next slot, with row 0's cache so far; returns the slot."""
        slot = self.active
        for layer in self.keys:
            self.keys[layer][slot, :, : self.position] = self.keys[layer][0, :, : self.position]
            self.values[layer][slot, :, : self.position] = self.values[layer][0, :, : self.position]
        self.states.append(state)
        if state.selects_per_layer:
            self.quest_rows.append(slot)
        return slot

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        if layer not in self.keys:
            _, h, _, d = key.shape
            shape = (self.capacity, h, self.max_len, d)
            self.keys[layer] = torch.zeros(shape, dtype=torch.float32)
            self.values[layer] = torch.zeros(shape, dtype=torch.float32)
        b, n = key.shape[0], key.shape[2]
        self.keys[layer][:b, :, start : start + n] = key
        self.values[layer][:b, :, start : start + n] = value

    def set_pages(self, row: int, pages: list[int], kv_head: int | None = None) -> None:
        """The row's attended decode pages, for one KV head or (None) for all of them."""
        on = torch.zeros(self.max_pages, dtype=torch.bool)
        if pages:
            on[torch.tensor(pages)] = True
        heads = slice(None) if kv_head is None else kv_head
        self.mask[row, heads, self.prompt_len :] = on.repeat_interleave(self.page_size)

    def set_state_pages(self, row: int, state: RequestKV) -> None:
        if state.group_pages is None:
            self.set_pages(row, state.pages)
            return
        for g, pages in enumerate(state.group_pages):
            self.set_pages(row, pages, g)

    def select_quest(self, query: torch.Tensor, keys: torch.Tensor, scale: float) -> None:
        """Quest rows choose this layer's pages from per-page key bounds (as reference.py)."""
        rows = self.quest_rows
        p, ps = self.prompt_len, self.page_size
        k = keys[rows, :, p:]  # [R, Hkv, ndec, D]
        ndec = k.shape[2]
        pages = -(-ndec // ps)
        pad = pages * ps - ndec
        if pad:
            # Repeating a real key leaves the tail page's min and max unchanged.
            k = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        k = k.view(len(rows), k.shape[1], pages, ps, -1)
        kmin, kmax = k.amin(dim=3), k.amax(dim=3)  # [R, Hkv, pages, D]
        hkv = kmin.shape[1]
        q = query[rows, :, 0, :].float()
        q = q.view(len(rows), hkv, -1, 1, q.shape[-1])  # [R, Hkv, g, 1, D]
        bounds = torch.maximum(q * kmin.unsqueeze(2), q * kmax.unsqueeze(2)).sum(-1) * scale
        bounds = bounds.reshape(len(rows), -1, pages).transpose(1, 2)  # [R, pages, Hq]
        for i, row in enumerate(rows):
            state = self.states[row]
            state.select_for_layer(bounds[i], hkv)
            self.set_state_pages(row, state)

    def add_mass(self, probs: torch.Tensor) -> None:
        """Fold one layer's probabilities (shape [B, Hq, T]) into per-page scores."""
        p, ps = self.prompt_len, self.page_size
        dec = probs[:, :, p:]
        ndec = dec.shape[2]
        pages = -(-ndec // ps)
        if pages * ps != ndec:
            dec = torch.nn.functional.pad(dec, (0, pages * ps - ndec))
        mass = dec.reshape(*dec.shape[:2], pages, ps).sum(-1)  # [B, Hq, pages]
        hmax, hmean = mass.amax(dim=1), mass.mean(dim=1)
        if self.acc is None:
            self.acc = torch.stack([hmax, hmax, hmean, hmean])
        else:
            torch.maximum(self.acc[0], hmax, out=self.acc[0])
            self.acc[1] += hmax
            torch.maximum(self.acc[2], hmean, out=self.acc[2])
            self.acc[3] += hmean
        self.layers += 1

    def take_scores(self) -> torch.Tensor:
        """The step's [4, B, pages] page scores in AGGREGATIONS order; resets the sums."""
        assert self.acc is not None
        scores = self.acc.clone()
        scores[1] /= self.layers
        scores[3] /= self.layers
        self.acc = None
        self.layers = 0
        return scores


class _Active:
    run: _Run | None = None


def _batched_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    run = _Active.run
    if run is None or run.position < 0:
        if run is not None:
            run.store(module.layer_idx, key, value, 0)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    run.store(module.layer_idx, key, value, run.position)
    t = run.position + 1
    b, hq, _, d = query.shape
    keys = run.keys[module.layer_idx][:b, :, :t]
    values = run.values[module.layer_idx][:b, :, :t]
    if run.quest_rows:
        run.select_quest(query, keys, scale)
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, d)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B, Hkv, g, T]
    logits.masked_fill_(~run.mask[:b, :, None, :t], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, values)  # [B, Hkv, g, D]
    run.add_mass(probs.view(b, hq, t))
    return out.reshape(b, 1, hq, d).to(query.dtype), None


AttentionInterface.register(ATTN_NAME, _batched_attention)


class BatchedPolicyRunner:
    """Teacher forcing and greedy decoding of B policy configurations as one batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def run(
        self,
        prompt_ids: list[int],
        configs: list[KVPolicyConfig],
        n: int,
        *,
        forced: list[int] | None = None,
        observe: Observer | None = None,
        record_row: int | None = None,
        snapshot_every: int = 0,
        choose: Chooser | None = None,
    ) -> BatchResult:
        """n positions: position i's logits predict token i (the first from the prefill).

        forced: the tokens to feed (teacher forcing); None feeds each row's own choice,
        `choose` (e.g. sampling; then no row may be lazy: put a non-dense row first) or
        argmax.
        """
        if forced is not None and len(forced) < n:
            raise ValueError(f"expected at least {n} forced tokens, got {len(forced)}")
        if len({c.page_size for c in configs}) != 1:
            raise ValueError("expected one page size across the batch")
        self.model.set_attn_implementation(ATTN_NAME)
        batch = len(configs)
        prompt_len = len(prompt_ids)
        states = [RequestKV(c, prompt_len=prompt_len) for c in configs]
        run = _Run(
            batch,
            prompt_len,
            prompt_len + n,
            configs[0].page_size,
            self.model.config.num_key_value_heads,
        )
        # Rows join the batch lazily when row 0 is dense (see _Run); otherwise all at once.
        lazy = configs[0].name == "dense"
        slot_of = [0] * batch
        for row in range(1 if lazy else batch):
            slot_of[row] = run.activate(states[row])
        pending = set(range(run.active, batch))
        result = BatchResult(
            tokens=[[] for _ in configs],
            retained_tokens=[[] for _ in configs],
            attended_tokens=[[] for _ in configs],
            stats=[],
        )
        _Active.run = run
        try:
            out = self.model(input_ids=torch.tensor([prompt_ids] * run.active), use_cache=False)
            logits = out.logits[:, -1].float()[slot_of]
            for i in range(n):
                if observe is not None:
                    observe(i, logits)
                if forced is not None:
                    tokens = [forced[i]] * batch
                elif choose is not None:
                    tokens = choose(logits)
                else:
                    tokens = logits.argmax(dim=-1).tolist()
                for row, token in enumerate(tokens):
                    result.tokens[row].append(token)
                if i == n - 1:
                    break
                run.position = prompt_len + i
                for row, state in enumerate(states):
                    state.begin_step()
                    result.retained_tokens[row].append(state.table.retained_tokens)
                    if row in pending and _drops_attention(state):
                        pending.discard(row)
                        slot_of[row] = run.activate(state)
                for slot, state in enumerate(run.states):
                    run.set_state_pages(slot, state)
                if snapshot_every and (i + 1) % snapshot_every == 0:
                    result.snapshots.append((i + 1, [list(s.table.retained) for s in states]))
                active_tokens = [0] * run.active
                for row, slot in enumerate(slot_of):
                    active_tokens[slot] = tokens[row]
                out = self.model(
                    input_ids=torch.tensor(active_tokens).view(run.active, 1),
                    position_ids=torch.full((run.active, 1), prompt_len + i),
                    use_cache=False,
                )
                logits = out.logits[:, -1].float()[slot_of]
                scores = run.take_scores()[:, slot_of]
                if record_row is not None:
                    result.recorded_scores.append(scores[:, record_row].clone())
                self._feed_scores(states, scores, result)
        finally:
            _Active.run = None
        result.stats = [s.stats() for s in states]
        return result

    @staticmethod
    def _feed_scores(states: list[RequestKV], scores: torch.Tensor, result: BatchResult) -> None:
        for row, state in enumerate(states):
            result.attended_tokens[row].append(state.attended_tokens)
            if not state.needs_scores:
                continue
            agg = AGGREGATIONS.index((state.config.head_agg, state.config.layer_agg))
            page_scores = scores[agg, row, state.pages]
            # One pre-aggregated "layer" of one "head": RequestKV passes it through as is.
            state.add_layer_mass(page_scores[:, None])


def _drops_attention(state: RequestKV) -> bool:
    """Whether this step the row attends to less than everything (it then differs from
    dense); once true it stays true."""
    if state.selects_per_layer:
        return len(state.table.retained) > state.config.budget_pages
    return state.table.evicted_pages > 0
