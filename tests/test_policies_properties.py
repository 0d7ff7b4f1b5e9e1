"""Every KV policy through the same invariants, driven exactly as the engine drives it.

Each decode step the engine calls `RequestKV.begin_step()` (fold the last step's
scores -> account the new token -> pick victims -> evict -> choose the attended
pages), then per layer either `select_for_layer(bounds)` (quest) or
`add_layer_mass(mass)` (policies that need scores). The suite does the same with random
per-layer, per-head masses and checks, after every step, the invariants of
DESIGN.md "The RaaS policy, precisely" against an independent model of the state.

Masses are multiples of 1/8 plus a per-page offset of k/2^20 that is the same for every
head and layer: every aggregate (max or mean over 1, 2 or 4 heads and layers) is then
exact in float32, pages never tie, and no aggregate lands within 1e-3 of an alpha, so
the model can predict "used" and the top-k refresh without rounding doubt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.policies import KVPolicyConfig, make_policy
from raas_backend.policies.raas import RaaSPolicy
from raas_backend.request_kv import RequestKV

CASES = ["raas", "raas-adaptive", "dense", "streaming", "h2o", "quest"]
EVICTING = {"raas", "streaming", "h2o"}
ALPHAS = [0.0, 0.05, 0.1, 0.3]  # none is within 1e-3 of a multiple of 1/128
FRACTIONS = ["0.05", "0.07", "0.14", "0.25", "0.3", "0.5", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and leaves the shared cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Scenario:
    config: KVPolicyConfig
    prompt_len: int
    steps: int
    heads: int
    layers: int
    seed: int


@st.composite
def scenarios(draw, case: str) -> Scenario:
    name = case.split("-")[0]
    page_size = draw(st.integers(1, 16))
    budget = draw(st.integers(2, 5)) * page_size + draw(st.integers(0, page_size - 1))
    kwargs: dict = dict(
        name=name,
        page_size=page_size,
        budget_tokens=budget,
        alpha=draw(st.sampled_from(ALPHAS)),
        head_agg=draw(st.sampled_from(["max", "mean"])),
        layer_agg=draw(st.sampled_from(["max", "mean"])),
    )
    if case == "raas-adaptive":
        kwargs["refresh_top_fraction"] = float(draw(st.sampled_from(FRACTIONS)))
        kwargs["alpha"] = draw(st.sampled_from([0.3, 0.9]))
    if name == "h2o":
        kwargs["recent_tokens"] = draw(st.integers(0, budget - page_size))
    return Scenario(
        config=KVPolicyConfig(**kwargs),
        prompt_len=draw(st.integers(0, 40)),
        steps=draw(st.integers(1, budget + 4 * page_size + 8)),
        heads=draw(st.sampled_from([1, 2, 4])),
        layers=draw(st.sampled_from([1, 2, 4])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _agg(values: list[float], how: str) -> float:
    return sum(values) / len(values) if how == "mean" else max(values)


def _random_masses(rng: random.Random, n: int, heads: int, layers: int) -> list[torch.Tensor]:
    """Per layer, a [n, heads] mass: multiples of 1/8 plus a distinct per-page offset."""
    offset = rng.sample(range(1, 4 * n + 1), n)
    out = []
    for _ in range(layers):
        base = [[rng.choice([0, 0, 0, 1, 2, 4, 8]) / 8 for _ in range(heads)] for _ in range(n)]
        out.append(
            torch.tensor(
                [[b + offset[p] / 2**20 for b in row] for p, row in enumerate(base)],
                dtype=torch.float32,
            )
        )
    return out


@dataclass
class Model:
    """What the policy state must be, kept independently of the implementation."""

    config: KVPolicyConfig
    prompt_len: int
    decode_len: int = 0
    retained: list[int] = field(default_factory=list)
    last_used: dict[int, int] = field(default_factory=dict)
    cum_mass: dict[int, float] = field(default_factory=dict)
    evicted: set[int] = field(default_factory=set)  # positions
    peak: int = 0  # most tokens held at once (after each step's eviction)

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def tail(self) -> int | None:
        return (self.decode_len - 1) // self.page_size if self.decode_len else None

    def tokens(self, page: int) -> int:
        if page == self.tail:
            return self.decode_len - page * self.page_size
        return self.page_size

    def positions(self, page: int) -> list[int]:
        start = self.prompt_len + page * self.page_size
        return list(range(start, start + self.tokens(page)))

    def record(self, pages: list[int], scores: list[float], step: int) -> None:
        """Fold the aggregated scores of the pages attended at `step`."""
        if self.config.name == "raas":
            used = {p for p, s in zip(pages, scores, strict=True) if s > self.config.alpha}
            frac = self.config.refresh_top_fraction
            if frac > 0 and pages:
                # The exact top fraction, rounded up, never fewer than one page.
                k = max(1, math.ceil(Fraction(str(frac)) * len(pages)))
                ranked = sorted(zip(scores, pages, strict=True), reverse=True)
                used |= {p for _, p in ranked[:k]}
            for p in used:
                self.last_used[p] = step
        elif self.config.name == "h2o":
            for p, s in zip(pages, scores, strict=True):
                self.cum_mass[p] += s

    def add_token(self, step: int) -> None:
        opens = self.decode_len % self.page_size == 0
        self.decode_len += 1
        if opens:
            page = self.tail
            self.retained.append(page)
            self.last_used[page] = step
            self.cum_mass[page] = 0.0

    def note_held(self) -> None:
        held = self.prompt_len + sum(self.tokens(p) for p in self.retained)
        self.peak = max(self.peak, held)

    def eligible(self) -> list[int]:
        """Retained pages the policy may evict (never the tail; h2o: outside the window)."""
        pages = [p for p in self.retained if p != self.tail]
        if self.config.name == "h2o":
            protected_from = self.decode_len - self.config.recent_tokens
            pages = [p for p in pages if (p + 1) * self.page_size <= protected_from]
        return pages

    def key(self, page: int):
        name = self.config.name
        if name == "raas":
            return (self.last_used[page], page)
        if name == "h2o":
            return (self.cum_mass[page], page)
        return (page,)


def _check_step(kv: RequestKV, model: Model, freed: list[int]) -> None:
    config, table = kv.config, kv.table
    name = config.name
    page_size = config.page_size
    prompt = model.prompt_len

    # The table agrees with the model on length and on what was evicted this step.
    assert table.seq_len == prompt + model.decode_len
    assert table.tail_page == model.tail
    evicted_pages = sorted({(pos - prompt) // page_size for pos in freed})
    expected_freed = [pos for p in evicted_pages for pos in model.positions(p)]
    assert freed == expected_freed, "eviction frees whole pages, in position order"
    if name not in EVICTING:
        assert freed == []
    candidates_before = model.eligible()
    retained_before = list(model.retained)
    keys_before = {p: model.key(p) for p in candidates_before}
    tokens_before = sum(model.tokens(p) for p in model.retained)

    # Never the tail, never a prompt position, never a position evicted before.
    assert model.tail not in evicted_pages
    assert all(pos >= prompt for pos in freed)
    assert model.evicted.isdisjoint(freed)
    assert set(evicted_pages) <= set(retained_before)
    model.evicted.update(freed)
    model.retained = [p for p in model.retained if p not in set(evicted_pages)]
    model.note_held()
    assert table.retained == model.retained
    assert table.evicted_tokens == len(model.evicted)

    retained_tokens = table.retained_decode_tokens
    if name in EVICTING:
        # The budget holds after every eviction step, with no page evicted needlessly.
        assert retained_tokens <= config.budget_tokens
        if evicted_pages:
            assert retained_tokens > config.budget_tokens - page_size
        else:
            assert tokens_before <= config.budget_tokens
        # The engine frees victims before it allocates the new token's slot: the count
        # held never passes prompt + budget.
        assert table.peak_retained_tokens <= prompt + config.budget_tokens
        # Victims are eligible (never the tail; for h2o never a page touching the recent
        # window) and come first in the policy's order: raas (last_used, id), streaming
        # id, h2o (cumulative mass, id). Every victim ranks before every survivor that
        # could have been evicted instead.
        survivors = [p for p in candidates_before if p not in evicted_pages]
        assert set(evicted_pages) <= set(candidates_before)
        if evicted_pages and survivors:
            assert max(keys_before[p] for p in evicted_pages) < min(
                keys_before[p] for p in survivors
            )
    else:
        # dense and quest keep every page: O(N) memory.
        assert table.retained == list(range(table.num_pages))
        assert table.evicted_pages == 0

    assert table.peak_retained_tokens == max(model.peak, prompt)

    # Every position is held or evicted, exactly once; the prompt always comes first.
    held = table.retained_positions().tolist()
    assert held[:prompt] == list(range(prompt))
    assert sorted(held + sorted(model.evicted)) == list(range(table.seq_len))
    if model.tail is not None:
        assert model.tail in table.retained

    # The policy's own per-page state equals the model's.
    if name == "raas":
        assert kv.policy.last_used == [model.last_used[p] for p in range(table.num_pages)]
    if name == "h2o":
        assert kv.policy.cum_mass == [model.cum_mass[p] for p in range(table.num_pages)]


def _check_attended(kv: RequestKV, pages: list[int]) -> None:
    positions, token_page = kv.positions()
    table = kv.table
    want = list(range(table.prompt_len))
    for p in pages:
        want += list(table.page_positions(p))
    assert positions.tolist() == want
    assert token_page.tolist() == [-1] * table.prompt_len + [
        i for i, p in enumerate(pages) for _ in table.page_positions(p)
    ]


def _run(sc: Scenario) -> None:
    config = sc.config
    rng = random.Random(sc.seed)
    kv = RequestKV(config, prompt_len=sc.prompt_len)
    model = Model(config, sc.prompt_len)
    last_pages: list[int] = []
    last_scores: list[float] = []
    for step in range(1, sc.steps + 1):
        model.record(last_pages, last_scores, step - 1)
        model.add_token(step)
        freed = kv.begin_step()
        assert kv.step == step
        _check_step(kv, model, freed)
        table = kv.table

        if config.name == "quest":
            retained = table.retained
            for _ in range(sc.layers):
                bounds = _random_masses(rng, len(retained), sc.heads, 1)[0] * 8 - 3
                agg = [_agg(row, config.head_agg) for row in bounds.tolist()]
                chosen = kv.select_for_layer(bounds)
                keep = min(len(retained), config.budget_pages)
                # At most budget pages, always the tail, the others by highest bound.
                assert chosen == sorted(chosen) and len(chosen) == keep
                assert table.tail_page in chosen
                bound_of = dict(zip(retained, agg, strict=True))
                others = [bound_of[p] for p in chosen if p != table.tail_page]
                dropped = [bound_of[p] for p in retained if p not in chosen]
                if others and dropped:
                    assert min(others) > max(dropped)
                # The layer attends exactly the prompt and the chosen pages.
                assert kv.pages == chosen
                _check_attended(kv, chosen)
            last_pages, last_scores = [], []
            continue

        assert kv.pages == table.retained
        _check_attended(kv, kv.pages)
        if not kv.needs_scores:
            last_pages, last_scores = [], []
            continue
        masses = _random_masses(rng, len(kv.pages), sc.heads, sc.layers)
        for mass in masses:
            kv.add_layer_mass(mass)
        last_pages = list(kv.pages)
        last_scores = [
            _agg([_agg(m[i].tolist(), config.head_agg) for m in masses], config.layer_agg)
            for i in range(len(last_pages))
        ]
    stats = kv.stats()
    assert stats["policy"] == config.name
    assert stats["dense_equivalent_tokens"] == sc.prompt_len + sc.steps


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_policy_invariants(case, data):
    sc = data.draw(scenarios(case))
    _run(sc)


# -- behaviour ------------------------------------------------------------------------


def _drive(config: KVPolicyConfig, prompt_len: int, steps: int, score_of) -> RequestKV:
    """Run `steps` decode steps; page p gets mass score_of(p, pages) in every head/layer."""
    kv = RequestKV(config, prompt_len=prompt_len)
    for _ in range(steps):
        kv.begin_step()
        if kv.needs_scores:
            mass = torch.tensor([[score_of(p, kv.pages)] * 2 for p in kv.pages])
            kv.add_layer_mass(mass)
            kv.add_layer_mass(mass)
    return kv


def _old_page_attended(page: int, pages: list[int]) -> float:
    # Page 0 is a milestone: strongly attended at every step; no other page is.
    return 0.6 if page == 0 else 0.02


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_raas_keeps_an_attended_old_page_streaming_does_not(page_size):
    """DESIGN.md: raas keeps an old page that keeps being attended while evicting newer
    pages that are not; StreamingLLM, on the same scores, evicts the old page."""
    budget = 3 * page_size
    steps = 10 * page_size
    raas = _drive(
        KVPolicyConfig(name="raas", budget_tokens=budget, alpha=0.1, page_size=page_size),
        prompt_len=5,
        steps=steps,
        score_of=_old_page_attended,
    )
    assert 0 in raas.table.retained
    assert 1 not in raas.table.retained
    assert raas.table.retained[0] == 0
    assert raas.policy.last_used[0] == steps - 1  # refreshed at every step
    assert raas.table.retained_decode_tokens <= budget
    streaming = _drive(
        KVPolicyConfig(name="streaming", budget_tokens=budget, page_size=page_size),
        prompt_len=5,
        steps=steps,
        score_of=_old_page_attended,
    )
    assert 0 not in streaming.table.retained
    assert streaming.table.retained == list(
        range(streaming.table.num_pages - len(streaming.table.retained), streaming.table.num_pages)
    )
    # Both hold the same memory: the difference is which pages, not how many.
    assert raas.table.retained_tokens == streaming.table.retained_tokens


def test_raas_evicts_a_milestone_once_it_stops_being_attended():
    page_size, budget = 4, 12
    config = KVPolicyConfig(
        name="raas", budget_tokens=budget, alpha=0.1, page_size=page_size, refresh_top_fraction=0
    )
    kv = RequestKV(config, prompt_len=3)
    for step in range(1, 80):
        kv.begin_step()
        attended_zero = step < 40
        mass = torch.tensor([[0.6 if p == 0 and attended_zero else 0.02] for p in kv.pages])
        kv.add_layer_mass(mass)
        if step == 39:
            assert 0 in kv.table.retained
    assert 0 not in kv.table.retained


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_adaptive_variant_refreshes_the_top_page_below_alpha(alpha):
    """refresh_top_fraction marks the top pages by mass used even when no mass exceeds
    alpha; without it, the same page ages out like any other."""
    page_size, budget = 4, 16

    def low_scores(page: int, pages: list[int]) -> float:
        return 0.2 if page == 0 else 0.01  # below alpha, but page 0 is the top page

    common = dict(name="raas", budget_tokens=budget, alpha=alpha, page_size=page_size)
    plain = _drive(
        KVPolicyConfig(**common, refresh_top_fraction=0.0),
        prompt_len=2,
        steps=60,
        score_of=low_scores,
    )
    assert 0 not in plain.table.retained
    adaptive = _drive(
        KVPolicyConfig(**common, refresh_top_fraction=0.01),
        prompt_len=2,
        steps=60,
        score_of=low_scores,
    )
    assert 0 in adaptive.table.retained
    assert adaptive.policy.last_used[0] == 59


@pytest.mark.parametrize(("frac", "n", "k"), [(0.07, 100, 7), (0.14, 50, 7), (0.28, 25, 7)])
def test_adaptive_refresh_count_is_the_exact_ceiling(frac, n, k):
    """ceil(frac * n) pages, not one more when frac * n rounds up past an integer."""
    config = KVPolicyConfig(
        name="raas", budget_tokens=10 * n, alpha=0.9, page_size=1, refresh_top_fraction=frac
    )
    policy = make_policy(config, prompt_len=0)
    assert isinstance(policy, RaaSPolicy)
    for step in range(1, n + 1):
        policy.on_token(step)
    pages = policy.attended_pages()
    assert len(pages) == n
    scores = torch.arange(n, dtype=torch.float32) / (4 * n)  # all below alpha, distinct
    policy.update(scores, n + 5)
    refreshed = [p for p in pages if policy.last_used[p] == n + 5]
    assert refreshed == pages[-k:]


def test_h2o_protects_the_recent_window_even_with_no_mass():
    page_size = 4
    config = KVPolicyConfig(
        name="h2o", budget_tokens=5 * page_size, recent_tokens=2 * page_size, page_size=page_size
    )
    # Old pages 0 and 1 are heavy hitters; everything newer gets no mass.
    kv = _drive(config, 0, 40, lambda p, pages: 0.5 if p in (0, 1) else 0.0)
    assert kv.table.retained[:2] == [0, 1]
    decode_len = kv.table.decode_len
    window_pages = {
        p for p in range(kv.table.num_pages) if (p + 1) * page_size > decode_len - 2 * page_size
    }
    assert window_pages <= set(kv.table.retained)


@pytest.mark.parametrize("name", ["raas", "h2o"])
def test_ties_evict_the_oldest_page(name):
    """With no page ever used (raas) or attended (h2o), both fall back to oldest-first."""
    page_size = 2
    config = KVPolicyConfig(name=name, budget_tokens=6, page_size=page_size, recent_tokens=0)
    kv = RequestKV(config, prompt_len=1)
    for _ in range(30):
        before = list(kv.table.retained)
        freed = kv.begin_step()
        if freed:
            assert freed == list(kv.table.page_positions(before[0]))
        kv.add_layer_mass(torch.zeros(len(kv.pages), 1))
    assert kv.table.retained == [12, 13, 14]


def test_quest_positions_follow_the_layer_selection():
    """Each layer attends the prompt and its chosen pages, not every retained page."""
    config = KVPolicyConfig(name="quest", budget_tokens=8, page_size=4)
    kv = RequestKV(config, prompt_len=3)
    for _ in range(20):
        kv.begin_step()
    retained = kv.table.retained
    assert retained == [0, 1, 2, 3, 4]
    bounds = torch.tensor([[5.0], [1.0], [9.0], [2.0], [0.0]])  # tail (4) has the lowest
    assert kv.select_for_layer(bounds) == [2, 4]
    positions, token_page = kv.positions()
    assert positions.tolist() == [0, 1, 2] + list(range(11, 15)) + list(range(19, 23))
    assert token_page.tolist() == [-1] * 3 + [0] * 4 + [1] * 4
    assert kv.table.retained_tokens == 3 + 20  # nothing freed


def test_update_rejects_scores_of_the_wrong_length():
    kv = RequestKV(KVPolicyConfig(name="raas", budget_tokens=32), prompt_len=4)
    kv.begin_step()
    with pytest.raises(ValueError, match="expected 1 page scores, got 2"):
        kv.policy.update(torch.zeros(2), 1)


def test_the_tail_page_cannot_be_evicted():
    kv = RequestKV(KVPolicyConfig(name="raas", budget_tokens=32), prompt_len=4)
    kv.begin_step()
    with pytest.raises(ValueError, match="tail"):
        kv.table.evict([0])
