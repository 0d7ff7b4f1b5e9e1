"""Sparse-page decode on one CUDA GPU: dense vs raas vs quest, per layer and per model step.

One run prints every ratio side by side (the machines are noisy):

1. Copy bandwidth of the card (device-to-device copy, bytes read + written): the ceiling.
2. Per layer, for Llama-8B-like (32/8/128) and Qwen-7B-like (28/4/128) heads:
   - ``dense_*``: FlashInfer over the whole context, CUDA-core (cc) and tensor-core (tc)
     paths, page_size 1 (token slots, our layout) and 16 (physical pages; best case);
   - ``subset_*``: FlashInfer over the retained subset only (prompt + budget + tail);
     the "subset attention kernel alone" of the targets;
   - ``raas_fi_*``: FlashInfer with LSE + the Triton page-mass kernel (re-reads K);
   - ``raas_triton``: the fused Triton kernel (attention + page mass in one pass);
   - ``quest``: bounds update for the new token + Triton bound + top-k + index fill +
     FlashInfer tc over the selection;
   - once-per-step work (index build + plan; batched bookkeeping), amortized over layers.
   Grid: batch 32 / budget 2K over context 4K..64K; budget 1K/4K at 32K; batch 1/8/64
   at 32K.
3. A model-shaped decode step: 32 layers of a Llama-8B-like model with random bf16
   weights (QKV/O projections, SwiGLU MLP, LM head) and each method's attention, at
   batch 32 over context 4K..64K: TPOT.

Timing: CUDA events around loops of back-to-back calls (median of repeats); inputs
rotate over disjoint slices of a larger pool so small cases do not run from L2.

Usage: python benchmarks/gpu_decode.py --out results.json [--quick] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raas_backend.kernels.batched_policy import BatchedRaaSState, decode_step  # noqa: E402
from raas_backend.kernels.cuda.decode import SparseDecoder  # noqa: E402
from raas_backend.kernels.cuda.flashinfer_decode import (  # noqa: E402
    CUDA_CORE_GROUPS,
    FlashInferDecode,
)
from raas_backend.kernels.cuda.indexing import build_sparse_indices  # noqa: E402
from raas_backend.kernels.cuda.page_mass import page_mass_from_lse  # noqa: E402
from raas_backend.kernels.cuda.quest import (  # noqa: E402
    build_page_bounds,
    plan_quest,
    quest_scores,
    quest_select,
    update_page_bounds,
)
from raas_backend.kernels.cuda.triton_decode import (  # noqa: E402
    TritonDecodeConfig,
    fused_sparse_decode,
)

PAGE = 16
PROMPT = 64
DT = torch.bfloat16
L2_ROTATE_BYTES = 256 << 20
POOL_LIMIT_BYTES = 24 << 30
HEADS = {"llama8b": (32, 8, 128), "qwen7b": (28, 4, 128)}


def log(msg: str) -> None:
    print(msg, flush=True)


def time_loop(
    fn: Callable[[int], object], rotations: int, iters: int = 20, repeats: int = 5
) -> float:
    """Median microseconds per call over `repeats` loops of `iters` back-to-back calls."""
    for i in range(3):
        fn(i % rotations)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i % rotations)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def time_graph(
    fn: Callable[[int], object], rotations: int, iters: int = 20, repeats: int = 5
) -> float | None:
    """Like `time_loop`, but the loop is captured in a CUDA graph and replayed: device
    time without Python launch overhead (SGLang decodes under CUDA graphs). None if the
    capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                fn(i % rotations)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fn(i % rotations)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        del graph
        return statistics.median(times)
    except Exception as exc:  # noqa: BLE001 - report and fall back to eager numbers
        log(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        torch.cuda.synchronize()
        return None


def measure(res: dict[str, float], name: str, fn: Callable[[int], object], rotations: int) -> None:
    """Record eager (``name``) and graph-replayed (``name@g``) microseconds per call."""
    res[name] = time_loop(fn, rotations, repeats=3)
    g = time_graph(fn, rotations)
    if g is not None:
        res[name + "@g"] = g


def time_host(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median microseconds of a call that syncs (host-inclusive)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    us = time_loop(lambda _: b.copy_(a), 1, iters=10)
    return 2 * n / (us * 1e-6) / 1e12


def versions() -> dict[str, str]:
    import flashinfer
    import triton

    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "flashinfer": flashinfer.__version__,
    }
    try:
        out["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["driver"] = "?"
    return out


@dataclass
class Scenario:
    """B requests of `context` tokens (PROMPT of them prompt) with a `budget` of decode tokens."""

    name: str
    hq: int
    hkv: int
    dim: int
    batch: int
    context: int
    budget: int
    results: dict[str, float] = field(default_factory=dict)

    @property
    def kv_token_bytes(self) -> int:
        return self.hkv * self.dim * 2  # one of K or V

    @property
    def dense_bytes(self) -> int:
        return self.batch * self.context * self.kv_token_bytes * 2


class Pools:
    """K/V pools of R rotations (disjoint slices) and everything the methods plan on."""

    def __init__(self, sc: Scenario, seed: int = 0) -> None:
        self.sc = sc
        b, n = sc.batch, sc.context
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.slots = b * n
        subset_bytes = b * (PROMPT + sc.budget + PAGE) * sc.kv_token_bytes * 2
        per_rot = self.slots * sc.kv_token_bytes * 2
        self.rot = int(
            max(1, min(math.ceil(L2_ROTATE_BYTES / subset_bytes), POOL_LIMIT_BYTES // per_rot))
        )
        total = self.rot * self.slots
        self.k = torch.randn(total, sc.hkv, sc.dim, device="cuda", dtype=DT, generator=gen)
        self.v = torch.randn(total, sc.hkv, sc.dim, device="cuda", dtype=DT, generator=gen)
        self.q = torch.randn(self.rot, b, sc.hq, sc.dim, device="cuda", dtype=DT, generator=gen)
        self.req_to_token = (
            torch.randperm(self.slots, device="cuda", generator=gen).view(b, n).to(torch.int32)
        )
        self.rows = torch.arange(b, device="cuda")
        self.prompt = torch.full((b,), PROMPT, dtype=torch.int32, device="cuda")
        self.seq = torch.full((b,), n, dtype=torch.int32, device="cuda")
        # RaaS tables: budget/16 - 1 random decode pages + the tail, per request.
        n_pages = -(-(n - PROMPT) // PAGE)
        keep = min(sc.budget // PAGE - 1, n_pages - 1)
        scores = torch.rand(b, n_pages - 1, device="cuda", generator=gen)
        chosen = (
            scores.topk(keep, dim=1).indices.sort(dim=1).values
            if keep > 0
            else scores[:, :0].long()
        )
        tail = torch.full((b, 1), n_pages - 1, device="cuda", dtype=torch.int64)
        self.pages = torch.cat([chosen, tail], dim=1).to(torch.int32)
        self.num_pages = torch.full((b,), keep + 1, dtype=torch.int32, device="cuda")
        self.idx = build_sparse_indices(
            self.req_to_token, self.rows, self.prompt, self.seq, self.pages, self.num_pages, PAGE
        )
        self.sm = 1 / math.sqrt(sc.dim)
        self.dense_indptr = torch.arange(b + 1, dtype=torch.int32) * n
        self.dense_indices = self.req_to_token.reshape(-1).contiguous()
        self.subset_bytes = self.idx.kv_indices.numel() * sc.kv_token_bytes * 2
        self.scored_tokens = self.idx.kv_indices.numel() - b * PROMPT

    def kv(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slots
        return self.k[r * s : (r + 1) * s], self.v[r * s : (r + 1) * s]

    def page16(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(r)
        shape = (self.slots // PAGE, PAGE, self.sc.hkv, self.sc.dim)
        return k.view(shape), v.view(shape)


def fi_wrapper(tc: bool):
    import flashinfer

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc), ws


def plan16(wrapper, sc: Scenario, tokens_per_req: int, gen: torch.Generator, sm: float) -> None:
    """FlashInfer page_size 16 over random physical pages (the baseline's setup)."""
    b = sc.batch
    pages_per_req = -(-tokens_per_req // PAGE)
    total_pages = b * sc.context // PAGE
    perm = torch.randperm(total_pages, device="cuda", generator=gen)[: b * pages_per_req]
    indptr = torch.arange(b + 1, dtype=torch.int32) * pages_per_req
    last = torch.full((b,), tokens_per_req - (pages_per_req - 1) * PAGE, dtype=torch.int32)
    wrapper.plan(
        indptr, perm.to(torch.int32), last, sc.hq, sc.hkv, sc.dim, PAGE,
        pos_encoding_mode="NONE", q_data_type=DT, kv_data_type=DT, sm_scale=sm,
    )  # fmt: skip


@dataclass
class Tuned:
    """Kernel configurations chosen by the tuning pass for one head layout."""

    fused: TritonDecodeConfig
    mass: tuple[int, int, int]  # pages_per_block, num_warps, num_stages
    quest: tuple[int, int, int]  # block_p, num_warps, num_stages


def run_scenario(sc: Scenario, wrappers: dict, tuned: Tuned) -> None:
    res = sc.results
    p = Pools(sc)
    gen = torch.Generator(device="cuda").manual_seed(1)
    group = sc.hq // sc.hkv
    paths = [True] + ([False] if group in CUDA_CORE_GROUPS else [])
    res["rotations"] = p.rot
    res["subset_tokens_per_req"] = p.idx.kv_indices.numel() / sc.batch
    for tc in paths:
        tag = "tc" if tc else "cc"
        fi = wrappers[("p1", tc)]
        fi.plan(p.dense_indptr, p.dense_indices, p.sm)
        measure(res, f"dense_{tag}_p1", lambda r, fi=fi: fi.run(p.q[r], *p.kv(r), False), p.rot)
        w16, _ = wrappers[("p16", tc)]
        plan16(w16, sc, sc.context, gen, p.sm)
        measure(res, f"dense_{tag}_p16", lambda r, w=w16: w.run(p.q[r], p.page16(r)), p.rot)
        fi.plan(p.idx.kv_indptr_host, p.idx.kv_indices, p.sm)
        measure(res, f"subset_{tag}_p1", lambda r, fi=fi: fi.run(p.q[r], *p.kv(r), False), p.rot)
        acc = torch.zeros(p.idx.layout.num_pages, device="cuda")

        def raas_fi(r: int, fi=fi, acc=acc) -> None:
            k, v = p.kv(r)
            _, lse = fi.run(p.q[r], k, v, True)
            ppb, nw, ns = tuned.mass
            page_mass_from_lse(
                p.q[r], k, p.idx.kv_indptr, p.idx.kv_indices, lse, p.idx.layout, p.sm,
                head_max_into=acc, pages_per_block=ppb, num_warps=nw, num_stages=ns,
            )  # fmt: skip

        measure(res, f"raas_fi_{tag}", raas_fi, p.rot)
        measure(res, f"subset_lse_{tag}_p1", lambda r, fi=fi: fi.run(p.q[r], *p.kv(r), True), p.rot)
        if tc:
            plan16(w16, sc, p.idx.kv_indices.numel() // sc.batch, gen, p.sm)
            measure(res, "subset_tc_p16", lambda r, w=w16: w.run(p.q[r], p.page16(r)), p.rot)
    acc = torch.zeros(p.idx.layout.num_pages, device="cuda")
    ws: dict[str, torch.Tensor] = {}

    def fused(r: int, score: bool = True) -> None:
        fused_sparse_decode(
            p.q[r], *p.kv(r), p.idx.kv_indptr, p.idx.kv_indices, p.idx.layout, p.sm,
            p.idx.max_len, score=score, head_max_into=acc if score else None,
            config=tuned.fused, workspace=ws,
        )  # fmt: skip

    measure(res, "raas_triton", fused, p.rot)
    measure(res, "subset_triton", lambda r: fused(r, score=False), p.rot)
    # Quest: bounds over every page of every rotation, lists planned once per step.
    qp = plan_quest(p.req_to_token, p.rows, p.prompt, p.seq, PAGE, sc.budget // PAGE)
    pages_per_row = -(-(sc.context - PROMPT) // PAGE)
    bounds = [
        build_page_bounds(
            p.kv(r)[0], p.req_to_token, p.rows, p.prompt, p.seq - 1, PAGE, pages_per_row
        )
        for r in range(min(p.rot, 4))
    ]
    fi = wrappers[("p1", True)]
    fi.plan(qp.kv_indptr_host, qp.kv_indices, p.sm)
    k_new = torch.randn(sc.batch, sc.hkv, sc.dim, device="cuda", dtype=DT)
    score_buf = torch.empty(sc.batch, max(qp.width, 1), device="cuda")

    def quest(r: int) -> None:
        kmin, kmax = bounds[r % len(bounds)]
        k, v = p.kv(r)
        update_page_bounds(kmin, kmax, k_new, p.rows, p.prompt, p.seq, PAGE)
        bp, nw, ns = tuned.quest
        quest_select(
            p.q[r], kmin, kmax, qp, p.sm, p.req_to_token, scores_out=score_buf,
            block_p=bp, num_warps=nw, num_stages=ns,
        )  # fmt: skip
        fi.run(p.q[r], k, v, False)

    measure(res, "quest", quest, p.rot)
    res["quest_bounds_bytes"] = sc.batch * pages_per_row * sc.kv_token_bytes * 2

    # Once-per-step work (host-inclusive: each includes its one sync).
    def index_build() -> None:
        build_sparse_indices(p.req_to_token, p.rows, p.prompt, p.seq, p.pages, p.num_pages, PAGE)

    res["index_build_host"] = time_host(index_build)
    fi_sub = wrappers[("p1", True)]
    res["fi_plan_subset_host"] = time_host(
        lambda: fi_sub.plan(p.idx.kv_indptr_host, p.idx.kv_indices, p.sm)
    )
    res["fi_plan_dense_host"] = time_host(
        lambda: fi_sub.plan(p.dense_indptr, p.dense_indices, p.sm)
    )
    cap = p.pages.shape[1] + 2
    base = BatchedRaaSState(
        pages=torch.nn.functional.pad(p.pages, (0, 2), value=-1),
        last_used=torch.randint(0, 100, (sc.batch, cap), dtype=torch.int32, device="cuda"),
        num_pages=p.num_pages.clone(),
        prompt_lens=p.prompt.clone(),
        seq_lens=p.seq.clone(),
        budget_tokens=torch.full((sc.batch,), sc.budget, dtype=torch.int32, device="cuda"),
        page_size=PAGE,
    )
    step_scores = torch.rand(p.idx.layout.num_pages + 2 * sc.batch, device="cuda")

    def bookkeeping() -> None:
        # The fused kernel updates the state in place: repeated calls walk it forward
        # (one token per call, evicting as pages open), a steady decode state.
        decode_step(base, step_scores, 101, alpha=0.1)

    measure(res, "raas_bookkeeping", lambda _: bookkeeping(), 1)

    def quest_plan() -> None:
        q2 = plan_quest(p.req_to_token, p.rows, p.prompt, p.seq, PAGE, sc.budget // PAGE)
        fi.plan(q2.kv_indptr_host, q2.kv_indices, p.sm)

    res["quest_plan_host"] = time_host(quest_plan)
    res["subset_bytes"] = p.subset_bytes
    res["scored_k_bytes"] = p.scored_tokens * sc.kv_token_bytes


def summarize(sc: Scenario, copy_bw: float, graph: bool, layers: int = 32) -> dict[str, float]:
    """Headline ratios; ``graph`` reads the graph-replayed timings where they exist."""
    r = sc.results

    def t(name: str) -> float:
        return r.get(name + "@g", r[name]) if graph else r[name]

    def best(prefix: str) -> float:
        return min(t(k) for k in r if k.startswith(prefix) and "@" not in k)

    dense = best("dense_")
    subset = (
        t("subset_tc_p1") if "subset_cc_p1" not in r else min(t("subset_tc_p1"), t("subset_cc_p1"))
    )
    book = t("raas_bookkeeping") / layers
    raas_fi = best("raas_fi_")
    raas_tr = t("raas_triton")
    step_fi = raas_fi + book + (r["index_build_host"] + r["fi_plan_subset_host"]) / layers
    step_tr = raas_tr + book + r["index_build_host"] / layers
    raas_layer = min(raas_fi, raas_tr)
    raas_step = min(step_fi, step_tr)
    quest_step = t("quest") + r["quest_plan_host"] / layers
    floor = r["subset_bytes"] / (copy_bw * 1e12) * 1e6
    quest_floor = (r["subset_bytes"] + r["quest_bounds_bytes"]) / (copy_bw * 1e12) * 1e6
    return {
        "best_dense_us": dense,
        "subset_us": subset,
        "raas_fi_us": raas_fi,
        "raas_triton_us": raas_tr,
        "raas_layer_us": raas_layer,
        "raas_step_fi_us": step_fi,
        "raas_step_triton_us": step_tr,
        "raas_step_us": raas_step,
        "raas_kernels_over_subset": raas_layer / subset,
        "quest_step_us": quest_step,
        "raas_over_subset": raas_step / subset,
        "dense_over_raas": dense / raas_step,
        "quest_over_raas": quest_step / raas_step,
        "subset_floor_us": floor,
        "raas_over_floor": raas_step / floor,
        "quest_over_floor": quest_step / quest_floor,
        "raas_tbps": r["subset_bytes"] / (raas_layer * 1e-6) / 1e12,
        "subset_tbps": r["subset_bytes"] / (subset * 1e-6) / 1e12,
        "dense_tbps": sc.dense_bytes / (dense * 1e-6) / 1e12,
    }


FUSED_CANDIDATES = {
    f"t{bt}w{w}s{st}p{tp}{'d' if dot else ''}": TritonDecodeConfig(bt, tp, w, st, dot)
    for bt, tp, w, st in [
        (32, 1024, 2, 3),
        (64, 256, 2, 3),
        (64, 512, 2, 3),
        (64, 1024, 2, 3),
        (64, 2048, 2, 3),
        (64, 1024, 2, 4),
        (64, 1024, 4, 3),
        (128, 512, 4, 3),
        (128, 1024, 4, 3),
    ]
    for dot in (False, True)
}
MASS_CANDIDATES = [(2, 4, 3), (4, 4, 3), (8, 4, 3), (4, 8, 3), (8, 8, 3), (4, 4, 2), (2, 2, 3)]
QUEST_CANDIDATES = [(32, 4, 3), (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 2)]


def tune(heads: str, wrappers: dict) -> tuple[Tuned, dict[str, float]]:
    """Pick each Triton kernel's configuration at batch 32, context 32K, budget 2K."""
    hq, hkv, dim = HEADS[heads]
    sc = Scenario(heads, hq, hkv, dim, 32, 32768, 2048)
    p = Pools(sc)
    out: dict[str, float] = {}
    acc = torch.zeros(p.idx.layout.num_pages, device="cuda")
    ws: dict[str, torch.Tensor] = {}

    def timed(name: str, fn: Callable[[int], object]) -> None:
        g = time_graph(fn, p.rot)
        out[name] = g if g is not None else time_loop(fn, p.rot)

    for name, cfg in FUSED_CANDIDATES.items():

        def fused(r: int, cfg: TritonDecodeConfig = cfg) -> None:
            fused_sparse_decode(
                p.q[r], *p.kv(r), p.idx.kv_indptr, p.idx.kv_indices, p.idx.layout, p.sm,
                p.idx.max_len, head_max_into=acc, config=cfg, workspace=ws,
            )  # fmt: skip

        timed(f"fused_{name}", fused)
    fi = wrappers[("p1", True)]
    fi.plan(p.idx.kv_indptr_host, p.idx.kv_indices, p.sm)
    lses = [fi.run(p.q[r], *p.kv(r), True)[1] for r in range(p.rot)]
    for ppb, nw, ns in MASS_CANDIDATES:

        def mass(r: int, ppb: int = ppb, nw: int = nw, ns: int = ns) -> None:
            page_mass_from_lse(
                p.q[r], p.kv(r)[0], p.idx.kv_indptr, p.idx.kv_indices, lses[r], p.idx.layout,
                p.sm, head_max_into=acc, pages_per_block=ppb, num_warps=nw, num_stages=ns,
            )  # fmt: skip

        timed(f"mass_{ppb}_{nw}_{ns}", mass)
    qp = plan_quest(p.req_to_token, p.rows, p.prompt, p.seq, PAGE, sc.budget // PAGE)
    pages_per_row = -(-(sc.context - PROMPT) // PAGE)
    kmin, kmax = build_page_bounds(
        p.kv(0)[0], p.req_to_token, p.rows, p.prompt, p.seq, PAGE, pages_per_row
    )
    score_buf = torch.empty(sc.batch, max(qp.width, 1), device="cuda")
    for bp, nw, ns in QUEST_CANDIDATES:

        def qscore(r: int, bp: int = bp, nw: int = nw, ns: int = ns) -> None:
            quest_scores(p.q[r], kmin, kmax, qp, p.sm, out=score_buf, block_p=bp,
                         num_warps=nw, num_stages=ns)  # fmt: skip

        timed(f"questscore_{bp}_{nw}_{ns}", qscore)
    best_fused = min(FUSED_CANDIDATES, key=lambda n: out[f"fused_{n}"])
    best_mass = min(MASS_CANDIDATES, key=lambda c: out["mass_{}_{}_{}".format(*c)])
    best_quest = min(QUEST_CANDIDATES, key=lambda c: out["questscore_{}_{}_{}".format(*c)])
    out["chosen"] = f"{best_fused} mass{best_mass} quest{best_quest}"  # type: ignore[assignment]
    return Tuned(FUSED_CANDIDATES[best_fused], best_mass, best_quest), out


STATE_FIELDS = ("pages", "last_used", "num_pages", "prompt_lens", "seq_lens", "budget_tokens")


def fresh_state(base: BatchedRaaSState) -> BatchedRaaSState:
    """A copy of base (the fused bookkeeping kernel updates a state in place)."""
    return BatchedRaaSState(**{f: getattr(base, f).clone() for f in STATE_FIELDS}, page_size=PAGE)


class ModelStep:
    """A Llama-8B-like decode step (random weights) over four rotating KV pools.

    ``tpot_ms(method, graph=False)``: eager, every step plans and launches from Python.
    ``graph=True``: as SGLang decodes, the per-step host work (index build, plans) runs
    eagerly and the 32 layers + LM head + bookkeeping replay from a CUDA graph captured
    once. The host work runs on a second set of planners (same lists, same cost), so the
    buffers the graph captured stay untouched; the lists are identical every step here.
    """

    layers, hidden, inter, vocab = 32, 4096, 14336, 128256

    def __init__(self, weights: list, lm_head: torch.Tensor, ctx: int, batch: int, budget: int,
                 triton_cfg: TritonDecodeConfig, with_quest: bool) -> None:  # fmt: skip
        hq, hkv, dim = HEADS["llama8b"]
        self.hq, self.hkv, self.dim, self.batch, self.budget = hq, hkv, dim, batch, budget
        self.weights, self.lm_head, self.triton_cfg = weights, lm_head, triton_cfg
        sc = Scenario("model", hq, hkv, dim, batch, ctx, budget)
        self.pools = [Pools(sc, seed=s) for s in range(4)]
        self.p0 = p0 = self.pools[0]
        gen = torch.Generator(device="cuda").manual_seed(5)
        self.x0 = torch.randn(batch, self.hidden, device="cuda", dtype=DT, generator=gen)
        self.new_slot = p0.req_to_token[:, -1].long()
        pages_per_row = -(-(ctx - PROMPT) // PAGE)
        self.qbounds = (
            [
                build_page_bounds(
                    pl.k, pl.req_to_token, pl.rows, pl.prompt, pl.seq - 1, PAGE, pages_per_row
                )  # fmt: skip
                for pl in self.pools
            ]
            if with_quest
            else []
        )
        self.state0 = BatchedRaaSState(
            pages=torch.nn.functional.pad(p0.pages, (0, 2), value=-1),
            last_used=torch.zeros(batch, p0.pages.shape[1] + 2, dtype=torch.int32, device="cuda"),
            num_pages=p0.num_pages.clone(),
            prompt_lens=p0.prompt.clone(),
            seq_lens=p0.seq.clone(),
            budget_tokens=torch.full((batch,), budget, dtype=torch.int32, device="cuda"),
            page_size=PAGE,
        )
        self.objs = self.make_objs()

    def make_objs(self) -> dict:
        hq, hkv, dim, cuda = self.hq, self.hkv, self.dim, torch.device("cuda")
        return {
            "dense": FlashInferDecode(hq, hkv, dim, DT, cuda, True),
            "quest": FlashInferDecode(hq, hkv, dim, DT, cuda, True),
            "raas_fi": SparseDecoder(hq, hkv, dim, backend="flashinfer"),
            "raas_triton": SparseDecoder(
                hq, hkv, dim, backend="triton", triton_config=self.triton_cfg
            ),
        }

    def plan(self, method: str, objs: dict) -> dict:
        """The once-per-step host work of a method (one sync for the sparse ones)."""
        p0 = self.p0
        if method == "dense":
            objs["dense"].plan(p0.dense_indptr, p0.dense_indices, p0.sm)
            return {}
        if method.startswith("raas"):
            idx = build_sparse_indices(
                p0.req_to_token, p0.rows, p0.prompt, p0.seq, p0.pages, p0.num_pages, PAGE
            )
            objs[method].plan_indices(idx, sm_scale=p0.sm)
            return {"acc": torch.zeros(idx.layout.num_pages, device="cuda")}
        qp = plan_quest(p0.req_to_token, p0.rows, p0.prompt, p0.seq, PAGE, self.budget // PAGE)
        objs["quest"].plan(qp.kv_indptr_host, qp.kv_indices, p0.sm)
        return {"qp": qp}

    def mlp(self, x: torch.Tensor, attn: torch.Tensor, wts: tuple) -> torch.Tensor:
        x = x + attn.reshape(self.batch, -1) @ wts[1]
        g, u = (x @ wts[2]).chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(g) * u) @ wts[3]

    def run_layers(self, method: str, objs: dict, ctx: dict, state: BatchedRaaSState) -> None:
        hq, hkv, dim = self.hq, self.hkv, self.dim
        acc = ctx.get("acc")
        if acc is not None:
            acc.zero_()
        x = self.x0
        for layer in range(self.layers):
            wts = self.weights[layer]
            pl = self.pools[layer % 4]
            qkv = x @ wts[0]
            q = qkv[:, : hq * dim].view(self.batch, hq, dim)
            kn = qkv[:, hq * dim : (hq + hkv) * dim].view(self.batch, hkv, dim)
            pl.k[self.new_slot] = kn
            pl.v[self.new_slot] = qkv[:, (hq + hkv) * dim :].view(self.batch, hkv, dim)
            if method == "dense":
                attn, _ = objs["dense"].run(q, pl.k, pl.v, False)
            elif method.startswith("raas"):
                attn, _ = objs[method].run(q, pl.k, pl.v, head_max_into=acc)
            else:
                kmin, kmax = self.qbounds[layer % 4]
                update_page_bounds(kmin, kmax, kn.contiguous(), pl.rows, pl.prompt, pl.seq, PAGE)
                quest_select(q, kmin, kmax, ctx["qp"], pl.sm, pl.req_to_token)
                attn, _ = objs["quest"].run(q, pl.k, pl.v, False)
            x = self.mlp(x, attn, wts)
        x @ self.lm_head
        if acc is not None:
            decode_step(state, acc, 101, alpha=0.1)

    def tpot_ms(self, method: str, graph: bool = False) -> float:
        if graph:
            objs = self.make_objs()
            shadow = self.make_objs()
            ctx = self.plan(method, objs)
            state = fresh_state(self.state0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run_layers(method, objs, ctx, state)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.run_layers(method, objs, ctx, state)

            def one() -> None:
                self.plan(method, shadow)
                g.replay()

        else:

            def one() -> None:
                self.run_layers(method, self.objs, self.plan(method, self.objs),
                                fresh_state(self.state0))  # fmt: skip

        one()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(3):
                one()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 3)
        return statistics.median(times)


def model_step_bench(
    contexts: list[int],
    batch: int,
    budget: int,
    methods: list[str],
    triton_cfg: TritonDecodeConfig,
    deadline: float,
) -> dict[str, dict[int, float]]:
    """TPOT (ms) of the Llama-8B-like decode step per method and context."""
    hq, hkv, dim = HEADS["llama8b"]
    h, inter = ModelStep.hidden, ModelStep.inter
    gen = torch.Generator(device="cuda").manual_seed(3)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=DT, generator=gen) / math.sqrt(shape[0])

    weights = [
        (w(h, (hq + 2 * hkv) * dim), w(hq * dim, h), w(h, 2 * inter), w(inter, h))
        for _ in range(ModelStep.layers)
    ]
    lm_head = w(h, ModelStep.vocab)
    out: dict[str, dict[int, float]] = {m + g: {} for m in methods for g in ("", "@g")}
    for ctx in contexts:
        if time.perf_counter() > deadline:
            log(f"model step: deadline reached before context {ctx}")
            break
        model = ModelStep(weights, lm_head, ctx, batch, budget, triton_cfg, "quest" in methods)
        for m in methods:
            out[m][ctx] = model.tpot_ms(m)
            try:
                out[m + "@g"][ctx] = model.tpot_ms(m, graph=True)
            except Exception as exc:  # noqa: BLE001 - keep the eager number
                log(f"model step graph {m}: {type(exc).__name__}: {str(exc)[:300]}")
                torch.cuda.synchronize()
            log(f"model step ctx={ctx} {m}: eager {out[m][ctx]:.2f} ms, graph "
                f"{out[m + '@g'].get(ctx, float('nan')):.2f} ms")  # fmt: skip
        del model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_decode.json"))
    ap.add_argument("--quick", action="store_true", help="a few scenarios only (smoke run)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="stop starting new work after this"
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    report: dict = {"versions": versions()}
    log(f"versions: {report['versions']}")
    bw = copy_bandwidth()
    report["copy_tbps"] = bw
    log(f"copy bandwidth: {bw:.2f} TB/s")
    grid: list[tuple[str, int, int, int]] = []  # (heads, batch, context, budget)
    contexts = [4096, 8192, 16384, 32768, 65536]
    for heads in HEADS:
        grid += [(heads, 32, c, 2048) for c in contexts]
        grid += [(heads, 32, 32768, bt) for bt in (1024, 4096)]
        grid += [(heads, b, 32768, 2048) for b in (1, 8, 64)]
    if args.quick:
        grid = [("llama8b", 32, 32768, 2048), ("qwen7b", 8, 8192, 1024)]
    wrappers: dict = {}
    scenarios: list[Scenario] = []
    tuned: dict[str, Tuned] = {}
    report["tuning"] = {}
    for heads, batch, ctx, budget in grid:
        if time.perf_counter() > deadline:
            log("deadline reached: skipping the rest of the per-layer grid")
            break
        hq, hkv, dim = HEADS[heads]
        key_layout = (hq, hkv, dim)
        if wrappers.get("layout") != key_layout:
            wrappers.clear()
            wrappers["layout"] = key_layout
            for tc in (True, False):
                if tc or (hq // hkv) in CUDA_CORE_GROUPS:
                    wrappers[("p1", tc)] = FlashInferDecode(
                        hq, hkv, dim, DT, torch.device("cuda"), tc
                    )
                    wrappers[("p16", tc)] = fi_wrapper(tc)
            t0 = time.perf_counter()
            tuned[heads], report["tuning"][heads] = tune(heads, wrappers)
            torch.cuda.empty_cache()
            log(f"tuning {heads} ({time.perf_counter() - t0:.0f}s): {report['tuning'][heads]}")
        sc = Scenario(heads, hq, hkv, dim, batch, ctx, budget)
        t0 = time.perf_counter()
        try:
            run_scenario(sc, wrappers, tuned[heads])
        except Exception:  # noqa: BLE001 - one broken case must not lose the others
            log(f"{heads} B={batch} N={ctx} L={budget}: FAILED\n{traceback.format_exc()}")
            torch.cuda.empty_cache()
            continue
        torch.cuda.empty_cache()
        se = summarize(sc, bw, graph=False)
        s = summarize(sc, bw, graph=True)
        sc.results.update({f"sum_{k}": v for k, v in s.items()})
        sc.results.update({f"eager_{k}": v for k, v in se.items()})
        scenarios.append(sc)
        log(
            f"{heads} B={batch} N={ctx} L={budget}: dense {s['best_dense_us']:.0f}us subset "
            f"{s['subset_us']:.0f}us raas {s['raas_step_us']:.0f}us "
            f"quest {s['quest_step_us']:.0f}us "
            f"| dense/raas {s['dense_over_raas']:.1f}x quest/raas {s['quest_over_raas']:.2f}x "
            f"raas/subset {s['raas_over_subset']:.2f} raas/floor {s['raas_over_floor']:.2f} "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        log(
            "   "
            + " ".join(
                f"{k}={v:.1f}"
                for k, v in sc.results.items()
                if not k.startswith(("sum_", "eager_"))
            )
        )
        report["per_layer"] = [
            {
                "name": x.name,
                "batch": x.batch,
                "context": x.context,
                "budget": x.budget,
                **x.results,
            }
            for x in scenarios
        ]
        args.out.write_text(json.dumps(report, indent=1))
    if not args.skip_model and time.perf_counter() < deadline:
        methods = ["dense", "raas_fi", "raas_triton", "quest"]
        model_cfg = tuned["llama8b"].fused if "llama8b" in tuned else TritonDecodeConfig()
        ctxs = [4096, 16384, 32768, 65536] if not args.quick else [8192]
        try:
            report["model_step_ms"] = model_step_bench(
                ctxs, 32, 2048, methods, model_cfg, deadline + 90
            )
        except Exception:  # noqa: BLE001
            log(f"model step: FAILED\n{traceback.format_exc()}")
        args.out.write_text(json.dumps(report, indent=1))
    log(f"total {time.perf_counter() - t_start:.0f}s")
    # Final table (the reply carries the end of the output).
    log(
        "\nheads B N L | dense subset raas_kern raas_step quest_step floor (us) | dense/raas "
        "quest/raas kern/subset step/subset step/floor"
    )
    for sc in scenarios:
        s = {k[4:]: v for k, v in sc.results.items() if k.startswith("sum_")}
        log(
            f"{sc.name} {sc.batch} {sc.context} {sc.budget} | {s['best_dense_us']:.0f} "
            f"{s['subset_us']:.0f} {s['raas_layer_us']:.0f} {s['raas_step_us']:.0f} "
            f"{s['quest_step_us']:.0f} {s['subset_floor_us']:.0f} | {s['dense_over_raas']:.1f} "
            f"{s['quest_over_raas']:.2f} {s['raas_kernels_over_subset']:.2f} "
            f"{s['raas_over_subset']:.2f} {s['raas_over_floor']:.2f}"
        )
    if "model_step_ms" in report:
        log("model step TPOT ms: " + json.dumps(report["model_step_ms"]))


if __name__ == "__main__":
    main()
